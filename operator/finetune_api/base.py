"""The base model every API type derives from, and cross-field rules written once.

A `Rule` carries both a CEL expression (emitted into the CRD as `x-kubernetes-validations`, so
the apiserver rejects bad specs at admission) and the same check in Python (so the trainer,
run standalone on a YAML file, rejects them too, with the same message).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic.alias_generators import to_camel


@dataclass(frozen=True)
class Rule:
    cel: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None  # e.g. ".maxSteps": where kubectl points the error


def _emit_rules(schema: dict[str, Any], cls: type) -> None:
    rules = getattr(cls, "rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [
            {"rule": r.cel, "message": r.message, **({"fieldPath": r.field_path} if r.field_path else {})}
            for r in rules
        ]


class ApiModel(BaseModel):
    """camelCase on the wire, snake_case in Python; unknown fields are errors, not silently dropped."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", validate_default=True,
        json_schema_extra=_emit_rules,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):
        for rule in self.rules:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self

    def wire(self, **kw) -> dict[str, Any]:
        """The object as the apiserver stores it: camelCase, no unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json", **kw)
