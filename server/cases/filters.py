"""Filterable case fields held in memory, column-wise by label, to turn a filter into a mask.

A search filter becomes one boolean array over labels (numpy, a few ms for a million cases);
the index then applies it inside the hnswlib graph walk.  Rebuilt from SQLite at start-up.
A missing value never matches a filter on that field.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from dataclasses import dataclass

import numpy as np
from medserve.server.cases.store import CaseRecord

SEXES = ("female", "male", "other", "unknown")
_SEX_CODE = {name: i + 1 for i, name in enumerate(SEXES)}  # 0 = not recorded
_NO_DATE = np.iinfo(np.int32).min
_EPOCH = dt.date(1970, 1, 1)


def normalize_icd10(code: str) -> str:
    """'i21.4 ' -> 'I214': codes are compared without dots or case."""
    return code.strip().upper().replace(".", "")


def normalize_department(name: str) -> str:
    return " ".join(name.split()).casefold()


@dataclass(frozen=True)
class Filters:
    """A conjunction; within a list field any value matches.  ICD-10 entries match as prefixes
    ('I21' matches 'I21.4'), which is how clinicians query the hierarchy."""

    departments: tuple[str, ...] = ()
    sexes: tuple[str, ...] = ()
    age_min: int | None = None
    age_max: int | None = None
    icd10_prefixes: tuple[str, ...] = ()
    admitted_from: dt.date | None = None
    admitted_to: dt.date | None = None

    def is_empty(self) -> bool:
        return self == Filters()


class CaseAttributes:
    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._live = np.zeros(capacity, dtype=bool)
        self._dept = np.full(capacity, -1, dtype=np.int32)
        self._age = np.full(capacity, -1, dtype=np.int16)
        self._sex = np.zeros(capacity, dtype=np.int8)
        self._admitted = np.full(capacity, _NO_DATE, dtype=np.int32)
        self._dept_ids: dict[str, int] = {}
        # ICD code -> labels.  Per-label code lists are not kept (they would cost ~100 bytes a
        # case); callers pass the previous codes on update and delete, read from SQLite.
        self._codes: dict[str, set[int]] = {}
        self.count = 0

    def put(self, record: CaseRecord, previous_icd10: tuple[str, ...] = ()) -> None:
        label = record.label
        with self._lock:
            self._grow(label + 1)
            if self._live[label]:
                self._drop_codes(label, previous_icd10)
            else:
                self.count += 1
            self._live[label] = True
            if record.department is None:
                self._dept[label] = -1
            else:
                key = normalize_department(record.department)
                self._dept[label] = self._dept_ids.setdefault(key, len(self._dept_ids))
            self._age[label] = -1 if record.age is None else record.age
            self._sex[label] = _SEX_CODE.get(record.sex or "", 0)
            self._admitted[label] = _days(record.admission_date)
            for code in {normalize_icd10(c) for c in record.icd10}:
                self._codes.setdefault(code, set()).add(label)

    def load(self, rows: list[tuple]) -> None:
        """Bulk form of ``put`` for start-up: rows of (label, department, age, sex, icd10 JSON,
        admission date ISO) for labels not yet present.  A loop over plain tuples, no records:
        a million cases load in seconds."""
        if not rows:
            return
        labels = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
        # Departments, dates and codes repeat across cases: normalise each distinct one once.
        departments: dict[str | None, int] = {None: -1}
        dates: dict[str | None, int] = {None: int(_NO_DATE)}
        codes: dict[str, str] = {}
        with self._lock:
            self._grow(int(labels.max()) + 1)
            dept, age, sex, admitted = [], [], [], []
            for label, department, a, s, icd10, admission in rows:
                if department not in departments:
                    key = normalize_department(department)
                    departments[department] = self._dept_ids.setdefault(key, len(self._dept_ids))
                dept.append(departments[department])
                age.append(-1 if a is None else a)
                sex.append(_SEX_CODE.get(s, 0))
                if admission not in dates:
                    dates[admission] = _days(dt.date.fromisoformat(admission))
                admitted.append(dates[admission])
                if icd10 != "[]":
                    for raw in json.loads(icd10):
                        code = codes.get(raw) or codes.setdefault(raw, normalize_icd10(raw))
                        self._codes.setdefault(code, set()).add(label)
            self.count += int((~self._live[labels]).sum())
            self._live[labels] = True
            self._dept[labels] = dept
            self._age[labels] = age
            self._sex[labels] = sex
            self._admitted[labels] = admitted

    def remove(self, label: int, icd10: tuple[str, ...]) -> None:
        with self._lock:
            if label < len(self._live) and self._live[label]:
                self._live[label] = False
                self._drop_codes(label, icd10)
                self.count -= 1

    def live_mask(self) -> np.ndarray:
        with self._lock:
            return self._live.copy()

    def mask(self, filters: Filters) -> np.ndarray:
        """Boolean array indexed by label: live cases matching every condition."""
        with self._lock:
            mask = self._live.copy()
            if filters.departments:
                ids = [
                    self._dept_ids[k]
                    for k in map(normalize_department, filters.departments)
                    if k in self._dept_ids
                ]
                mask &= np.isin(self._dept, ids)
            if filters.sexes:
                mask &= np.isin(self._sex, [_SEX_CODE[s] for s in filters.sexes])
            if filters.age_min is not None:
                mask &= self._age >= filters.age_min
            if filters.age_max is not None:
                mask &= (self._age >= 0) & (self._age <= filters.age_max)
            if filters.admitted_from is not None:
                mask &= self._admitted >= _days(filters.admitted_from)
            if filters.admitted_to is not None:
                mask &= (self._admitted != _NO_DATE) & (
                    self._admitted <= _days(filters.admitted_to)
                )
            if filters.icd10_prefixes:
                mask &= self._icd_mask(filters.icd10_prefixes)
            return mask

    def _icd_mask(self, prefixes: tuple[str, ...]) -> np.ndarray:
        wanted = tuple(normalize_icd10(p) for p in prefixes)
        hits = np.zeros(len(self._live), dtype=bool)
        for code, labels in self._codes.items():
            if code.startswith(wanted) and labels:
                hits[np.fromiter(labels, dtype=np.int64, count=len(labels))] = True
        return hits

    def _drop_codes(self, label: int, icd10: tuple[str, ...]) -> None:
        for code in {normalize_icd10(c) for c in icd10}:
            labels = self._codes.get(code)
            if labels is not None:
                labels.discard(label)
                if not labels:
                    del self._codes[code]

    def _grow(self, size: int) -> None:
        if size <= len(self._live):
            return
        new = max(size, 2 * len(self._live))
        self._live = _extend(self._live, new, False)
        self._dept = _extend(self._dept, new, -1)
        self._age = _extend(self._age, new, -1)
        self._sex = _extend(self._sex, new, 0)
        self._admitted = _extend(self._admitted, new, _NO_DATE)


def _extend(array: np.ndarray, size: int, fill: object) -> np.ndarray:
    out = np.full(size, fill, dtype=array.dtype)
    out[: len(array)] = array
    return out


def _days(value: dt.date | None) -> int:
    return int(_NO_DATE) if value is None else (value - _EPOCH).days
