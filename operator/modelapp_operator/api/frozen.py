"""The base of every spec model: immutable, unknown fields refused, fields by their Kubernetes (camelCase) names."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class FrozenModel(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
