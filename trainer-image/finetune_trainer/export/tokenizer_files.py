"""Writing a tokenizer folder that llama.cpp's converter reads correctly."""

from __future__ import annotations

import json
from pathlib import Path


def save_tokenizer(tokenizer, out_dir: Path) -> None:
    """save_pretrained, plus the added-token table transformers 5 no longer writes.

    llama.cpp's converter learns which pieces are control tokens and which are user-defined (Gemma's
    runs of spaces, tabs and newlines, its HTML tags) only from `added_tokens_decoder` in
    tokenizer_config.json; without it those pieces become normal ones and llama.cpp tokenizes
    whitespace differently from the model's own tokenizer.
    """
    tokenizer.save_pretrained(str(out_dir))
    config_file = out_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    if "added_tokens_decoder" not in config:
        config["added_tokens_decoder"] = {
            str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip, "normalized": t.normalized,
                     "single_word": t.single_word, "special": t.special}
            for i, t in sorted(tokenizer.added_tokens_decoder.items())}
        config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False))
