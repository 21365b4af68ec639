"""Ollama Modelfiles next to the GGUF files: FROM, the chat template in Ollama's Go syntax, and the
end-of-turn stop marker, so `ollama create -f` gives a model that chats and stops correctly."""

from __future__ import annotations

from pathlib import Path

from ..data.chat_templates import ChatTemplate


def write_modelfile(gguf_file: Path, template: ChatTemplate, name: str, quant: str) -> Path:
    lines = [
        f"# Ollama Modelfile for {name} ({quant}), written by finetune-operator.",
        f"#   ollama create {name}:{quant} -f {gguf_file.stem}.Modelfile",
        f"FROM ./{gguf_file.name}",
    ]
    go_template = template.ollama()
    if go_template:
        lines.append(f'TEMPLATE """{go_template.rstrip()}"""')
    if template.stop:
        lines.append(f'PARAMETER stop "{template.stop}"')
    out = gguf_file.with_suffix(".Modelfile")
    out.write_text("\n".join(lines) + "\n")
    return out
