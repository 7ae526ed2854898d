"""GLM-4's tiktoken rank file (``tokenizer.model``) as a byte-level BPE vocabulary and merges.

Why: GLM-4-9B-chat ships its vocabulary as ``base64(token bytes) rank`` lines that only its own
remote code (through tiktoken) reads. Written as a ``tokenizers`` byte-level BPE it loads in
transformers with no remote code and converts to OpenVINO tokenizer IRs. tiktoken merges, at
every step, the adjacent pair whose concatenation has the lowest rank; registering every split
of every token as a merge ranked by the token's rank makes BPE choose the same pair.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from functools import cache
from pathlib import Path

# The pre-tokenization pattern of GLM-4's tokenization_chatglm.py (cl100k-style).
GLM4_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
    r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


class RankFileError(ValueError):
    """The file is not a tiktoken rank file."""


def read_ranks(path: Path) -> dict[bytes, int]:
    """``{token bytes: rank}`` from a rank file; raise ``RankFileError`` on anything else."""
    ranks: dict[bytes, int] = {}
    try:
        text = Path(path).read_text(encoding="ascii")
    except (UnicodeDecodeError, OSError) as exc:
        raise RankFileError(f"{path} is not a tiktoken rank file: {exc}") from exc
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        try:
            token, rank = base64.b64decode(parts[0], validate=True), int(parts[1])
        except (IndexError, ValueError, binascii.Error) as exc:
            raise RankFileError(
                f"{path} line {number} is not 'base64 rank': {line[:40]!r}"
            ) from exc
        ranks[token] = rank
    if not ranks:
        raise RankFileError(f"{path} holds no ranks")
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise RankFileError(f"{path}: ranks are not 0..{len(ranks) - 1} without gaps")
    return ranks


def write_ranks(path: Path, ranks: Mapping[bytes, int]) -> None:
    """Write ``ranks`` in the file format GLM-4 ships (one ``base64 rank`` line each)."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda item: item[1])
    ]
    Path(path).write_text("\n".join(lines) + "\n", encoding="ascii")


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte, as ``tokenizers``' ByteLevel uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def token_string(token: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in token)


def vocab_and_merges(ranks: Mapping[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The byte-level BPE vocabulary (string -> id = rank) and merges equivalent to ``ranks``."""
    vocab = {token_string(token): rank for token, rank in ranks.items()}
    merges: list[tuple[int, int, int, str, str]] = []
    for token, rank in ranks.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in ranks and right in ranks:
                merges.append(
                    (rank, ranks[left], ranks[right], token_string(left), token_string(right))
                )
    merges.sort()
    return vocab, [(left, right) for *_, left, right in merges]
