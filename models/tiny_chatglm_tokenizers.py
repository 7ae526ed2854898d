"""Tiny tokenizer files in the hub layout of each ChatGLM family, for tests.

Why: the tests must prove that folders exactly as hospitals download them convert and serve,
without the multi-megabyte real vocabularies. Each family gets its real file formats (a
SentencePiece ``tokenizer.model`` for ChatGLM2/3, a tiktoken rank file for GLM-4-9B-chat,
``tokenizer.json`` for GLM-4-9B-chat-hf and GLM-4-0414) and real ``tokenizer_config.json``
fields, over a few hundred tokens learned from a fixed English + Chinese corpus. Where the real
repository ships remote code, a stand-in ``tokenization_chatglm.py`` is written that records
its own import in ``REMOTE_CODE_RAN`` and raises, so tests can prove it never ran.

Deterministic (same bytes every run) and built in well under a second, offline.
"""

from __future__ import annotations

import itertools
import json
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import regex
from medserve.models.chatglm_tokenizer import FamilyName
from medserve.models.sentencepiece_model import (
    ModelType,
    Piece,
    PieceType,
    SentencePieceModel,
    write_sentencepiece_model,
)
from medserve.models.tiktoken_ranks import GLM4_PATTERN, vocab_and_merges, write_ranks

REMOTE_CODE_MARKER = "REMOTE_CODE_RAN"
# Budgets that keep every id below the tiny models' embedding sizes (1024 / 1536 rows).
SENTENCEPIECE_PIECES = 900
GLM4_RANKS = 1200
GLM4_SPECIALS = (
    "<|endoftext|>",
    "[MASK]",
    "[gMASK]",
    "[sMASK]",
    "<sop>",
    "<eop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
)
CORPUS = (
    "The patient is a 65-year-old man with chest pain since yesterday evening.",
    "Blood pressure 150/95 mmHg, heart rate 88 beats per minute, temperature 37.2 C.",
    "Take 2 tablets of 500 mg twice daily after meals; review in 14 days.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, how are you today? I am fine, thank you. Please describe your symptoms.",
    "The doctor ordered an ECG, a chest X-ray and troponin tests for the patient.",
    "def dose(weight_kg: float) -> float:\n    return 0.5 * weight_kg\n",
    "    if weight_kg > 100:\n        return 50.0\n",
    "患者男，65岁，胸痛一天，伴出汗。既往高血压病史十年。",
    "你好，请问有什么可以帮您？请描述一下您的症状。",
    "建议复查血常规，注意休息，多喝水。如有不适，请及时就医。",
    "医生，我头痛三天了，没有发热，晚上睡不着应该怎么办？",
    "诊断：急性心肌梗死。治疗：阿司匹林、氯吡格雷，必要时介入治疗。",
    "你是一个乐于助人的医疗助手。请用中文简要回答患者的问题。",
    "You are a helpful medical assistant. Answer briefly and clearly.",
    "Round 1 2 3 4 5 6 7 8 9 10 11 12 2024 2025 100 mg 0.25 ml",
    "问：答：[Round 1]",
)

# Official prompt formats of the repositories (function tools only where the real template
# also knows built-in tools: the tiny files never render those).
CHATGLM3_HUB_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}[gMASK]sop<|{{ message['role'] }}|>\n "
    "{{ message['content'] }}{% else %}<|{{ message['role'] }}|>\n {{ message['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM4_HUB_TEMPLATE = (
    "[gMASK]<sop>{% for item in messages %}{% if item['tools'] is defined %}<|system|>\n"
    "你是一个名为 ChatGLM 的人工智能助手。你是基于智谱AI训练的语言模型 GLM-4 模型开发的，"
    "你的任务是针对用户的问题和要求提供适当的答复和支持。\n\n# 可用工具"
    "{% set tools = item['tools'] %}{% for tool in tools %}{% if tool['type'] == 'function' %}"
    "\n\n## {{ tool['function']['name'] }}\n\n{{ tool['function'] | tojson(indent=4) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{% endif %}{% endfor %}{% endif %}"
    "{% if item['content'] %}<|{{ item['role'] }}|>{{ item['metadata'] }}\n{{ item['content'] }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM4_HF_HUB_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    "{%- set function = tool.function if tool.get('function') else tool %}\n\n"
    "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    "{%- set meta = message.get('metadata', '') %}{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'observation' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
GLM4_0414_HUB_TEMPLATE = (
    "[gMASK]<sop>{%- if tools -%}<|system|>\n# 可用工具\n{% for tool in tools %}"
    "{%- set function = tool.function if tool.get('function') else tool %}\n\n"
    "## {{ function.name }}\n\n{{ function | tojson(indent=4, ensure_ascii=False) }}\n"
    "在调用上述函数时，请使用 Json 格式表示调用的参数。{%- endfor %}{%- endif -%}"
    "{%- for msg in messages %}{%- if msg.role == 'system' %}<|system|>\n{{ msg.content }}"
    "{%- endif %}{%- endfor %}{%- for message in messages if message.role != 'system' %}"
    "{%- set role = message['role'] %}{%- set content = message['content'] %}"
    "{%- set meta = message.get('metadata', '') %}{%- if role == 'user' %}<|user|>\n{{ content }}"
    "{%- elif role == 'assistant' and not meta %}<|assistant|>\n{{ content }}"
    "{%- elif role == 'assistant' and meta %}<|assistant|>{{ meta }} \n{{ content }}"
    "{%- elif role == 'tool' %}<|observation|>\n{{ content }}{%- endif %}{%- endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

_STAND_IN = '''"""Stand-in for the remote code of the hub repository: medserve must never run it."""

import pathlib

pathlib.Path(__file__).with_name("{marker}").write_text("tokenization_chatglm.py was imported\\n")
raise RuntimeError("remote code from a checkpoint folder was executed")
'''


def write_tiny_tokenizer_files(out_dir: Path, family: FamilyName) -> None:
    """Write the tokenizer files of ``family`` in its hub layout into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family in ("chatglm2", "chatglm3"):
        write_sentencepiece_model(out_dir / "tokenizer.model", tiny_sentencepiece_model())
        _write_json(out_dir / "tokenizer_config.json", _chatglm_config(family))
        _write_stand_in(out_dir)
    elif family == "glm4-chatglm":
        write_ranks(out_dir / "tokenizer.model", tiny_glm4_ranks())
        _write_json(out_dir / "tokenizer_config.json", _glm4_config(family))
        _write_stand_in(out_dir)
    elif family in ("glm4-hf", "glm4-0414"):
        _write_json(out_dir / "tokenizer.json", _glm4_tokenizer_json())
        _write_json(out_dir / "tokenizer_config.json", _glm4_config(family))
    else:
        raise ValueError(f"family={family!r}: not a ChatGLM tokenizer family")


def tiny_vocab_size(family: FamilyName) -> int:
    """Highest token id + 1 of the tiny tokenizer of ``family`` (special tokens included)."""
    if family == "chatglm2":
        return len(tiny_sentencepiece_model().pieces) + 5
    if family == "chatglm3":
        return len(tiny_sentencepiece_model().pieces) + 9
    return len(tiny_glm4_ranks()) + len(GLM4_SPECIALS)


def tiny_sentencepiece_model() -> SentencePieceModel:
    """A BPE SentencePiece model shaped like ChatGLM2/3's: byte fallback, dummy prefix, kept
    whitespace, split digits, whitespace-only pieces; control tokens <unk> <s> </s> first."""
    pieces = [
        Piece("<unk>", 0.0, PieceType.UNKNOWN),
        Piece("<s>", 0.0, PieceType.CONTROL),
        Piece("</s>", 0.0, PieceType.CONTROL),
        *(Piece(f"<0x{b:02X}>", 0.0, PieceType.BYTE) for b in range(256)),
    ]
    words = Counter(w for line in CORPUS for w in _sentencepiece_words(line))
    chars = sorted({c for w in words for c in w})
    budget = SENTENCEPIECE_PIECES - len(pieces) - len(chars)
    merged = _learn_merges(((tuple(w), n) for w, n in words.items()), budget, "".join)
    pieces += [Piece(text, -float(i), PieceType.NORMAL) for i, text in enumerate(merged)]
    pieces += [Piece(c, -float(len(merged) + i), PieceType.NORMAL) for i, c in enumerate(chars)]
    return SentencePieceModel(
        pieces=tuple(pieces),
        model_type=ModelType.BPE,
        byte_fallback=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalizer_name="identity",
        add_dummy_prefix=True,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
    )


def tiny_glm4_ranks() -> dict[bytes, int]:
    """tiktoken ranks learned on the corpus with GLM-4's pre-tokenization pattern."""
    words = Counter(
        piece.encode("utf-8") for line in CORPUS for piece in regex.findall(GLM4_PATTERN, line)
    )
    units = (tuple(bytes([b]) for b in word) for word in words)
    counts = ((seq, words[b"".join(seq)]) for seq in units)
    merged = _learn_merges(counts, GLM4_RANKS - 256, b"".join)
    ranks = {bytes([b]): b for b in range(256)}
    for token in merged:
        ranks.setdefault(token, len(ranks))
    return ranks


def _sentencepiece_words(line: str) -> list[str]:
    """SentencePiece's training split: dummy prefix, spaces as ▁ starting words (runs of ▁
    kept together), digits alone, and characters it will byte-encode (newline, tab) dropped."""
    text = "▁" + line.replace(" ", "▁")
    words = []
    for chunk in regex.split(r"[\n\t]", text):
        for word in regex.findall(r"▁+[^▁\d]*|\d|[^▁\d]+", chunk):
            words.append(word)
    return [w for w in words if w]


def _learn_merges(sequences: Iterable[tuple[tuple, int]], budget: int, join) -> list:
    """Plain BPE training: merge the most frequent adjacent pair (ties: smallest pair)."""
    words = [(list(seq), count) for seq, count in sequences]
    merged: list = []
    while len(merged) < budget:
        pairs: Counter = Counter()
        for seq, count in words:
            for pair in itertools.pairwise(seq):
                pairs[pair] += count
        if not pairs:
            break
        best_count = max(pairs.values())
        if best_count < 2:
            break
        best = min(pair for pair, n in pairs.items() if n == best_count)
        token = join(best)
        merged.append(token)
        for seq, _ in words:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == best:
                    seq[i : i + 2] = [token]
                i += 1
    return merged


def _glm4_tokenizer_json() -> dict:
    """The tokenizer.json GLM-4-9B-chat-hf / GLM-4-0414 ship: byte-level BPE from the ranks."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    ranks = tiny_glm4_ranks()
    vocab, merges = vocab_and_merges(ranks)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(GLM4_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in GLM4_SPECIALS]
    )
    gmask, sop = (tokenizer.token_to_id(t) for t in ("[gMASK]", "<sop>"))
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="[gMASK] <sop> $A",
                pair="[gMASK] <sop> $A $B",
                special_tokens=[("[gMASK]", gmask), ("<sop>", sop)],
            ),
        ]
    )
    data = json.loads(tokenizer.to_str())
    # As the 2024 hub files store them (and tokenizers < 0.20 read them): "left right".
    data["model"]["merges"] = [" ".join(pair) for pair in data["model"]["merges"]]
    return data


def _chatglm_config(family: FamilyName) -> dict:
    config: dict = {
        "name_or_path": f"THUDM/{family}-6b",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }
    if family == "chatglm3":
        config.update(
            chat_template=CHATGLM3_HUB_TEMPLATE,
            clean_up_tokenization_spaces=False,
            encode_special_tokens=False,
            eos_token="</s>",
            pad_token="<unk>",
            padding_side="left",
            unk_token="<unk>",
        )
    return config


def _glm4_config(family: FamilyName) -> dict:
    first = len(tiny_glm4_ranks())
    config: dict = {}
    if family == "glm4-chatglm":
        config["auto_map"] = {"AutoTokenizer": ["tokenization_chatglm.ChatGLM4Tokenizer", None]}
    config["added_tokens_decoder"] = {
        str(first + i): {
            "content": token,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, token in enumerate(GLM4_SPECIALS)
    }
    templates = {
        "glm4-chatglm": GLM4_HUB_TEMPLATE,
        "glm4-hf": GLM4_HF_HUB_TEMPLATE,
        "glm4-0414": GLM4_0414_HUB_TEMPLATE,
    }
    config.update(
        additional_special_tokens=list(GLM4_SPECIALS),
        chat_template=templates[family],
        clean_up_tokenization_spaces=False,
        do_lower_case=False,
        eos_token="<|endoftext|>",
        model_max_length=128000,
        pad_token="<|endoftext|>",
        padding_side="left",
        remove_space=False,
        tokenizer_class="ChatGLM4Tokenizer"
        if family == "glm4-chatglm"
        else "PreTrainedTokenizerFast",
    )
    if family != "glm4-chatglm":
        config["model_input_names"] = ["input_ids", "attention_mask"]
    return config


def _write_stand_in(out_dir: Path) -> None:
    (out_dir / "tokenization_chatglm.py").write_text(
        _STAND_IN.format(marker=REMOTE_CODE_MARKER), encoding="utf-8"
    )


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
