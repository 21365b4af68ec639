"""Tool parameters taken from the FinetuneJob API models, so a tool, the CRD and admission agree.

`like(TrainingSpec, "epochs")` is the API field's type constraints (bounds, patterns, enums via the
annotation) and help text, under the tool's own snake_case parameter name. Tool parameters default to
None ("leave it to the operator"), as the API stores only what the user set; the API default is named
in the description instead.
"""

from __future__ import annotations

from typing import Any

from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined


def api_field(model: type, name: str) -> FieldInfo:
    return model.model_fields[name]


def like(model: type, name: str, *, required: bool = False, description: str | None = None,
         **override: Any) -> Any:
    """A pydantic Field with `model.name`'s constraints and description; optional (None) unless required."""
    src = api_field(model, name)
    text = description or src.description or ""
    default = src.get_default(call_default_factory=True) if not src.is_required() else PydanticUndefined
    if not required and default is not PydanticUndefined and default is not None and "default:" not in text:
        shown = default if not isinstance(default, str) else f"'{default}'"
        text = f"{text.rstrip('.')}. Default: {shown}."
    info = FieldInfo.merge_field_infos(src, alias=None, validation_alias=None, serialization_alias=None,
                                       alias_priority=None, description=text, **override)
    info.default = PydanticUndefined if required else None
    info.default_factory = None
    return info
