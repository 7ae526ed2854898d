"""A detokenizer cheap enough to call twice per token per stream, proven equal at load time.

The OpenVINO detokenizer is a model: each call is an inference costing ~100 us, whatever the
number of tokens, and the worker decodes two short windows per token per stream
(accel/text_stream.py). The ``tokenizers`` library decodes the same ``tokenizer.json`` in
about 1 us. It is used only after it gave exactly the reference's text on every short window
of a set of hard samples (CJK, emoji, spaces, digits, special tokens); otherwise the engine
keeps its reference decoder. The engine's tokenizer stays the single source of truth.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import structlog

log = structlog.get_logger("medserve.accel.decode")

Decode = Callable[[Sequence[int]], str]
Encode = Callable[[str], list[int]]

CHECK_SAMPLES = (
    "The capital of France is Paris.",
    "患者男，65岁，胸痛3小时。诊断：急性心肌梗死",
    "Fever 🤒 and rash 🙂🙂 — naïve café, 12.5 mg/kg",
    "  two  spaces,\ttab,\n\nblank line ",
)
MAX_WINDOW = 4


def verified_fast_decoder(
    model_dir: Path, reference: Decode, encode: Encode, special_ids: Sequence[int] = ()
) -> Decode | None:
    """A ``tokenizers`` decoder for ``model_dir`` if it matches ``reference``, else None."""
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:  # an unreadable tokenizer.json: keep the reference decoder
        log.warning("fast_decoder_unavailable", reason=type(exc).__name__)
        return None

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=True)

    for sample in CHECK_SAMPLES:
        ids = [*special_ids, *encode(sample), *special_ids]
        windows = [ids] + [
            ids[i : i + n] for n in range(1, MAX_WINDOW + 1) for i in range(len(ids) - n + 1)
        ]
        for window in windows:
            if decode(window) != reference(window):
                log.info("fast_decoder_rejected", window_tokens=len(window))
                return None
    return decode
