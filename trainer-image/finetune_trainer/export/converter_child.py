"""llama.cpp's converter in a child started while the model trains: it imports, then converts when told.

    python -m finetune_trainer.export.converter_child CONVERTER_DIR BASE_MODEL [TOKENIZER_DIR]

Its imports (torch, its gguf-py, transformers' config classes for the model's family) take about as
long as a conversion. TOKENIZER_DIR, where given, holds the tokenizer files the merged folder will
hold, written ahead and marked complete last (convert.stage_tokenizer_files): the child parses them
meanwhile, so the conversion finds the vocabulary made (a SentencePiece vocabulary of 262k pieces, built
twice by the converter for Gemma 3) and tokenizer.json (33 MB for Gemma) parsed. Every precomputed
value is keyed by the bytes it came from; a file that differs at conversion time is read as usual.
The same converter, arguments and environment as a cold run, so the same file comes out. One line
on stdin (the converter's arguments, JSON) converts; end of input exits. Last line on stdout: what
was served ahead (AHEAD_PREFIX + JSON), for the parent's log.

Nothing here may import the trainer's heavy modules: this is the converter's process.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
import time
from pathlib import Path

AHEAD_PREFIX = "finetune-converter-ahead: "
COMPLETE = ".complete"  # written last into TOKENIZER_DIR
JSON_FILES = ("tokenizer.json", "tokenizer_config.json")  # what gguf's SpecialVocab parses
VOCAB_FILES = ("tokenizer.model", "added_tokens.json", "tokenizer_config.json")  # what the SentencePiece vocabulary reads
VOCAB_SIZE_KEYS = ["vocab_size_per_layer_input", "vocab_size"]  # as the converter looks it up
WAIT_SECONDS = 600.0


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _vocab_key(dir_model: Path, vocab_size) -> tuple:
    parts = [vocab_size]
    for name in VOCAB_FILES:
        f = dir_model / name
        parts.append(_digest(f.read_bytes()) if f.is_file() else None)
    return tuple(parts)


class Ahead:
    """What a thread of the child prepares from TOKENIZER_DIR while the parent trains."""

    def __init__(self, tokenizer_dir: Path, hparams: dict):
        from conversion.base import TextModel  # the converter's own, before install() replaces it

        self.dir, self.hparams = tokenizer_dir, hparams
        self.build_vocab = TextModel._create_vocab_sentencepiece
        self.parsed: dict[bytes, object] = {}  # sha256 of a file's bytes → its JSON, served once
        self.vocab: dict[tuple, tuple] = {}  # _vocab_key → (tokens, scores, toktypes)
        self.stats = {"json": 0, "vocab": 0, "misses": 0, "state": "waiting"}
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            deadline = time.monotonic() + WAIT_SECONDS
            while not (self.dir / COMPLETE).exists():
                if self._cancel.is_set() or time.monotonic() > deadline:
                    self.stats["state"] = "not ready"
                    return
                time.sleep(0.1)
            self.stats["state"] = "computing"
            for name in JSON_FILES:
                if (self.dir / name).is_file():
                    data = (self.dir / name).read_bytes()
                    self.parsed[_digest(data)] = json.loads(data)
            if (self.dir / "tokenizer.model").is_file():
                self._vocab_ahead()
            self.stats["state"] = "ready"
        except Exception as e:  # noqa: BLE001 - whatever failed is computed as usual at conversion
            self.parsed.clear()
            self.vocab.clear()
            self.stats["state"] = f"failed: {type(e).__name__}: {e}"[:300]

    def _vocab_ahead(self) -> None:
        from conversion.base import TextModel

        model = TextModel.__new__(TextModel)  # only what the vocabulary reads: its folder and hparams
        model.dir_model = self.dir
        model.hparams = {**self.hparams, **self.hparams.get("text_config", {})}  # as TextModel's own
        vocab_size = model.find_hparam(VOCAB_SIZE_KEYS, optional=True)
        self.vocab[_vocab_key(self.dir, vocab_size)] = self.build_vocab(model)

    def install(self) -> None:
        """At conversion: serve what was parsed ahead. Files already complete are parsed to the end (the
        conversion would parse them anyway); files not written yet are not waited for."""
        if not (self.dir / COMPLETE).exists():
            self._cancel.set()  # the thread stops waiting within a tenth of a second
        self._thread.join()
        if self.stats["state"] != "ready":
            return
        import gguf.vocab
        from conversion.base import TextModel

        ahead = self

        class _Json:  # gguf.vocab's json: a file parsed ahead is served when its bytes are the same
            def load(self, fp, **kw):
                text = fp.read()
                obj = ahead.parsed.pop(_digest(text.encode("utf-8")), None)
                ahead.stats["json" if obj is not None else "misses"] += 1
                return obj if obj is not None else json.loads(text, **kw)

            def __getattr__(self, name):
                return getattr(json, name)

        def vocab(model):  # the converter builds it twice for Gemma 3 (vocabulary, then embedding rows)
            key = _vocab_key(Path(model.dir_model), model.find_hparam(VOCAB_SIZE_KEYS, optional=True))
            made = ahead.vocab.get(key)
            if made is None:
                ahead.stats["misses"] += 1
                made = ahead.vocab[key] = ahead.build_vocab(model)
            else:
                ahead.stats["vocab"] += 1
            tokens, scores, toktypes = made
            return list(tokens), list(scores), list(toktypes)

        gguf.vocab.json = _Json()
        TextModel._create_vocab_sentencepiece = vocab


def main(argv: list[str]) -> None:
    conv, base = argv[0], argv[1]
    tokenizer_dir = Path(argv[2]) if len(argv) > 2 and argv[2] else None
    sys.argv = [os.path.join(conv, "convert_hf_to_gguf.py")]
    sys.path.insert(0, conv)
    import convert_hf_to_gguf

    hparams = None
    try:  # the config classes the converter's AutoConfig call will import, for this model's family
        from transformers import AutoConfig

        hparams = AutoConfig.from_pretrained(base, local_files_only=True).to_dict()
    except Exception:  # noqa: BLE001, S110 - only a warm-up
        pass
    ahead = None
    if tokenizer_dir is not None and hparams is not None:
        try:
            ahead = Ahead(tokenizer_dir, hparams)
        except Exception:  # noqa: BLE001, S110 - another converter layout: convert as usual
            ahead = None
    line = sys.stdin.readline()
    if not line:
        return
    if ahead is not None:
        ahead.install()
    sys.argv += json.loads(line)
    convert_hf_to_gguf.main()
    if ahead is not None:
        print(AHEAD_PREFIX + json.dumps(ahead.stats), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
