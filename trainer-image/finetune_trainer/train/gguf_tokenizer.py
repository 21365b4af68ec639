"""Rebuild a SentencePiece `tokenizer.model` (and from it a Hugging Face tokenizer) from a GGUF file.

transformers 5.17 reads a GGUF's vocabulary into a character-level tokenizer, which is wrong for
Gemma. The GGUF carries everything SentencePiece needs (pieces, scores, token types, special ids), so
we write the protobuf back. The `tokenizer.model` must also ship with every merged export: without it
llama.cpp's converter silently falls back to a GPT-2-style tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..export.tokenizer_files import save_tokenizer

# SentencePiece piece types; GGUF's tokenizer.ggml.token_type uses the same numbers.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def _array(reader, key: str) -> np.ndarray:
    field = reader.fields[key]
    return np.concatenate([field.parts[i] for i in field.data])


def _scalar(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def sentencepiece_from_gguf(gguf_file: Path, out_file: Path) -> dict:
    """Writes tokenizer.model; returns the special-token ids and flags found in the GGUF."""
    from gguf import GGUFReader
    from sentencepiece import sentencepiece_model_pb2 as pb

    reader = GGUFReader(str(gguf_file))
    model = _scalar(reader, "tokenizer.ggml.model")
    if model != "llama":  # llama.cpp's name for SentencePiece vocabularies
        raise ValueError(f"{gguf_file.name}: tokenizer type {model!r} is not SentencePiece; cannot rebuild it")
    field = reader.fields["tokenizer.ggml.tokens"]
    pieces = [bytes(field.parts[i]).decode("utf-8") for i in field.data]
    scores = _array(reader, "tokenizer.ggml.scores")
    types = _array(reader, "tokenizer.ggml.token_type")
    special = {
        "bos": _scalar(reader, "tokenizer.ggml.bos_token_id"),
        "eos": _scalar(reader, "tokenizer.ggml.eos_token_id"),
        "unk": _scalar(reader, "tokenizer.ggml.unknown_token_id"),
        "pad": _scalar(reader, "tokenizer.ggml.padding_token_id"),
        "add_bos": bool(_scalar(reader, "tokenizer.ggml.add_bos_token", True)),
        "add_eos": bool(_scalar(reader, "tokenizer.ggml.add_eos_token", False)),
        "add_space_prefix": bool(_scalar(reader, "tokenizer.ggml.add_space_prefix", False)),
        "chat_template": _scalar(reader, "tokenizer.chat_template"),
    }

    proto = pb.ModelProto()
    for i, (piece, score, kind) in enumerate(zip(pieces, scores.tolist(), types.tolist(), strict=True)):
        p = proto.pieces.add()
        p.piece, p.score = piece, score
        # SentencePiece needs exactly one UNKNOWN piece; GGUF files often mark <unk> as CONTROL.
        p.type = UNKNOWN if i == special["unk"] else (kind if kind in (1, 2, 3, 4, 5, 6) else NORMAL)
    ts = proto.trainer_spec
    ts.model_type = pb.TrainerSpec.BPE
    ts.vocab_size = len(pieces)
    ts.byte_fallback = bool((types == BYTE).any())
    ts.split_digits = True
    ts.allow_whitespace_only_pieces = True
    for name in ("bos", "eos", "unk", "pad"):
        idx = special[name]
        setattr(ts, f"{name}_id", -1 if idx is None else int(idx))
        if idx is not None:
            setattr(ts, f"{name}_piece", pieces[idx])
    ns = proto.normalizer_spec
    # Gemma: no normalization, no dummy prefix, spaces become U+2581 inside pieces.
    ns.name = "identity"
    ns.add_dummy_prefix = special["add_space_prefix"]
    ns.remove_extra_whitespaces = False
    ns.escape_whitespaces = True
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_bytes(proto.SerializeToString())
    special["pieces"] = pieces
    return special


def tokenizer_from_gguf(gguf_file: Path, out_dir: Path):
    """Writes tokenizer.model + the Hugging Face tokenizer files into out_dir and returns the tokenizer."""
    from transformers import AutoTokenizer, GemmaTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    special = sentencepiece_from_gguf(gguf_file, out_dir / "tokenizer.model")
    pieces = special["pieces"]

    def tok(name):
        return pieces[special[name]] if special[name] is not None else None

    # GemmaTokenizer converts tokenizer.model (BPE, byte fallback, "▁" for spaces); control pieces
    # become special added tokens and user-defined pieces (newline/space runs) plain added tokens.
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "add_bos_token": special["add_bos"],
        "add_eos_token": special["add_eos"], "bos_token": tok("bos"), "eos_token": tok("eos"),
        "unk_token": tok("unk"), "pad_token": tok("pad"),
    }))
    tokenizer = GemmaTokenizer.from_pretrained(str(out_dir))
    if special["chat_template"]:
        tokenizer.chat_template = special["chat_template"]
    save_tokenizer(tokenizer, out_dir)
    return AutoTokenizer.from_pretrained(str(out_dir))
