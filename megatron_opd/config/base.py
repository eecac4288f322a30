"""The base of every recipe model: unknown keys are errors."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class ConfigError(ValueError):
    """A recipe or override is invalid; the message names the field and what was expected."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())
