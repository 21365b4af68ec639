"""Row formats and their detection. Every format is normalized to one of two shapes:

- chat: {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
- raw:  {"prompt": str, "completion": str}   (text rows have an empty prompt)

Chat rows are rendered with the chat template; raw rows are tokenized as they are (TRL's convention for
prompt-completion and text data).
"""

from __future__ import annotations

from typing import Any

# The columns that identify each format (every DatasetFormat of the API but auto).
SIGNATURES: dict[str, frozenset[str]] = {
    "alpaca": frozenset({"instruction", "output"}),
    "sharegpt": frozenset({"conversations"}),
    "messages": frozenset({"messages"}),
    "prompt-completion": frozenset({"prompt", "completion"}),
    "text": frozenset({"text"}),
}
ROLE_ALIASES = {
    "system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant",
    "model": "assistant", "bot": "assistant",
}


class RowError(ValueError):
    """One row cannot be used; the message says why (the caller adds the row number)."""


class AmbiguousFormat(ValueError):
    pass


def detect(rows: list[Any], sample: int = 200) -> str:
    """The one format whose columns appear in the data; an error naming the columns otherwise."""
    columns: set[str] = set()
    for row in rows[:sample]:
        if isinstance(row, dict):
            columns |= set(row)
    matches = [name for name, cols in SIGNATURES.items() if cols <= columns]
    if len(matches) == 1:
        return matches[0]
    expected = "; ".join(f"{n}: {', '.join(sorted(c))}" for n, c in SIGNATURES.items())
    found = ", ".join(sorted(columns)) or "none (rows are not JSON objects)"
    if matches:
        raise AmbiguousFormat(f"the columns [{found}] fit several formats ({', '.join(matches)}); "
                              "set dataset.format to one of them")
    raise AmbiguousFormat(f"no known format has the columns [{found}]; expected columns per format: {expected}")


def _text(value: Any, what: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text", "")) for p in value)  # OpenAI content parts
    raise RowError(f"{what} must be a string, got {type(value).__name__}")


def _turns(value: Any, column: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"'{column}' must be a non-empty list of turns")
    turns = []
    for i, turn in enumerate(value):
        if not isinstance(turn, dict):
            raise RowError(f"{column}[{i}] is not an object")
        raw_role = turn.get("role", turn.get("from"))
        role = ROLE_ALIASES.get(str(raw_role).lower()) if raw_role is not None else None
        if role is None:
            raise RowError(f"{column}[{i}] has unknown role {raw_role!r} (expected system/user/assistant)")
        content = turn.get("content", turn.get("value"))
        if content is None:
            raise RowError(f"{column}[{i}] has no content")
        turns.append({"role": role, "content": _text(content, f"{column}[{i}].content")})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
        raise RowError(f"'{column}' has no non-empty assistant turn to learn from")
    return turns


def normalize(row: Any, fmt: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise RowError(f"row is a {type(row).__name__}, not a JSON object")
    missing = SIGNATURES[fmt] - set(row)
    if missing:
        raise RowError(f"missing {', '.join(sorted(missing))} for format {fmt}")
    if fmt == "alpaca":
        instruction = _text(row["instruction"], "instruction").strip()
        extra = row.get("input") or ""
        output = _text(row["output"], "output")
        if not instruction or not output.strip():
            raise RowError("empty instruction or output")
        user = instruction + ("\n\n" + _text(extra, "input").strip() if str(extra).strip() else "")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if row.get("system"):
            messages.insert(0, {"role": "system", "content": _text(row["system"], "system")})
        return {"messages": messages}
    if fmt in ("sharegpt", "messages"):
        column = "conversations" if fmt == "sharegpt" else "messages"
        return {"messages": _turns(row[column], column)}
    if fmt == "prompt-completion":
        prompt, completion = row["prompt"], row["completion"]
        if isinstance(prompt, list):  # conversational prompt-completion (TRL)
            tail = completion if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
            return {"messages": _turns(prompt + tail, "prompt+completion")}
        prompt, completion = _text(prompt, "prompt"), _text(completion, "completion")
        if not completion.strip():
            raise RowError("empty completion")
        return {"prompt": prompt, "completion": completion}
    text = _text(row["text"], "text")
    if not text.strip():
        raise RowError("empty text")
    return {"prompt": "", "completion": text}
