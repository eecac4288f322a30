"""The base of every recipe model: unknown keys are errors."""

from __future__ import annotations

from typing import Any, get_args

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and what was expected."""


def _admits(annotation: Any, kinds: tuple[type, ...]) -> bool:
    if annotation in kinds or annotation is Any:
        return True
    return any(_admits(arg, kinds) for arg in get_args(annotation))


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads ``true`` as 1 for a number; in a recipe that is always a mistake."""
        if isinstance(value, bool) and info.field_name in cls.model_fields:
            annotation = cls.model_fields[info.field_name].annotation
            if _admits(annotation, (int, float)) and not _admits(annotation, (bool,)):
                raise ValueError(f"expected a number, got the boolean {str(value).lower()}")
        return value
