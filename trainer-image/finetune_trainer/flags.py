"""Command-line flags made from the FinetuneJob API models: each flag's name, type, choices, help
and default come from its pydantic field, so the CLI, the CRD and the run config cannot disagree
(tools.py does the same for the agent tools' schemas).

    add_flags(parser, TrainingSpec, exclude={"lora"})     # --learning-rate, --batch-size, ...
    add_flags(parser, LoraSpec, prefix="lora")            # --lora-r, --lora-alpha, ...
    training = from_flags(args, TrainingSpec, lora=from_flags(args, LoraSpec, prefix="lora"))

A flag left out stays None, so the model applies its own default; the help shows that default.
"""

from __future__ import annotations

import argparse
import types
import typing
from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, ValidationError

from finetune_api.status import Reason

from .errors import ConfigError


def flag(name: str, prefix: str = "") -> str:
    return "--" + "-".join(p for p in (prefix, name.replace("_", "-")) if p)


def _dest(name: str, prefix: str) -> str:
    return "_".join(p for p in (prefix, name) if p)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def _branches(annotation: Any) -> list[Any]:
    """The alternatives of X | Y | None, without None and with Annotated unwrapped."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        out = []
        for arg in typing.get_args(annotation):
            out += _branches(arg)
        return out
    if typing.get_origin(annotation) is typing.Annotated:
        return _branches(typing.get_args(annotation)[0])
    return [] if annotation is type(None) else [annotation]


def _number_or(words: list[str], number: type):
    def parse(value: str) -> Any:
        return value if value in words else number(value)

    parse.__name__ = f"{number.__name__} or {'/'.join(words)}"  # argparse names it in its errors
    return parse


def argument(annotation: Any) -> dict[str, Any]:
    """argparse keywords for a field's type."""
    branches = _branches(annotation)
    literals = [a for b in branches if typing.get_origin(b) is Literal for a in typing.get_args(b)]
    others = [b for b in branches if typing.get_origin(b) is not Literal]
    if others == [bool]:
        return {"action": argparse.BooleanOptionalAction}
    if not others:
        return {"choices": literals}
    if typing.get_origin(others[0]) is list:
        return {"type": _csv, "action": "extend", "metavar": "A,B"}
    if literals:  # int | "auto"
        return {"type": _number_or([str(x) for x in literals], others[0]), "metavar": "|".join(
            [others[0].__name__.upper(), *map(str, literals)])}
    return {"type": others[0]}


def _default_text(model: type[BaseModel], name: str) -> str:
    value = model.model_fields[name].get_default(call_default_factory=True)
    if value is None or isinstance(value, BaseModel):
        return ""
    if isinstance(value, list):
        value = ",".join(map(str, value))
    return f" (default: {value})"


def add_flags(parser: argparse.ArgumentParser, model: type[BaseModel], *, prefix: str = "",
              only: Iterable[str] | None = None, exclude: Iterable[str] = (),
              aliases: dict[str, list[str]] | None = None) -> None:
    """One flag per field of `model` (nested models are left to the caller, with a prefix)."""
    only, exclude, aliases = set(only or model.model_fields), set(exclude), aliases or {}
    for name, field in model.model_fields.items():
        if name not in only or name in exclude:
            continue
        if any(isinstance(b, type) and issubclass(b, BaseModel) for b in _branches(field.annotation)):
            continue
        description = (field.description or "").replace("%", "%%")
        parser.add_argument(flag(name, prefix), *aliases.get(name, []), dest=_dest(name, prefix), default=None,
                            help=description + _default_text(model, name).replace("%", "%%"),
                            **argument(field.annotation))


def from_flags(args: argparse.Namespace, model: type[BaseModel], *, prefix: str = "", **extra: Any):
    """`model` from the flags add_flags made (those given) plus `extra`; a bad value is a ConfigError
    naming the flag."""
    values = {name: getattr(args, _dest(name, prefix)) for name in model.model_fields
              if getattr(args, _dest(name, prefix), None) is not None}
    try:
        return model(**values, **extra)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = flag(str(err["loc"][0]), prefix) if err["loc"] else model.__name__
        raise ConfigError(Reason.INVALID_SPEC, f"{where}: {err['msg'].removeprefix('Value error, ')}") from exc
