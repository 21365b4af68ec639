"""Chat templates shipped with the trainer, and which one a run uses.

`auto` keeps the tokenizer's own template; a tokenizer without one (the pretrained Gemma 3 base, a
GGUF without `tokenizer.chat_template`) gets our Gemma 3 template. The same template is saved with
the merged model, so the converter embeds it in every GGUF, and the Modelfile gets its Ollama twin.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

NAMED = ("gemma3", "chatml", "llama3")
# The token that ends an assistant turn, per template family.
STOP = {"gemma3": "<end_of_turn>", "chatml": "<|im_end|>", "llama3": "<|eot_id|>"}


@dataclass(frozen=True)
class ChatTemplate:
    name: str  # gemma3, chatml, llama3, or "tokenizer" for the model's own
    jinja: str
    stop: str | None  # end-of-turn marker, when known

    def ollama(self) -> str | None:
        """Go template for an Ollama Modelfile; None where Ollama's own detection must do."""
        family = self.name if self.name in NAMED else _family(self.jinja)
        if family is None:
            return None
        return resources.files(__package__).joinpath(f"templates/{family}.ollama").read_text()


def _family(jinja: str) -> str | None:
    for name, stop in STOP.items():
        if stop in jinja:
            return name
    return None


def load(name: str) -> str:
    if name not in NAMED:
        raise KeyError(f"unknown chat template {name!r}; known: {', '.join(NAMED)}")
    return resources.files(__package__).joinpath(f"templates/{name}.j2").read_text()


def resolve(choice: str, tokenizer) -> ChatTemplate:
    """`choice` is TrainingSpec.chat_template: auto, gemma3, chatml or llama3."""
    own = getattr(tokenizer, "chat_template", None)
    if choice == "auto" and isinstance(own, str) and own.strip():
        family = _family(own)
        return ChatTemplate("tokenizer", own, STOP.get(family) if family else tokenizer.eos_token)
    name = "gemma3" if choice == "auto" else choice
    return ChatTemplate(name, load(name), STOP[name])
