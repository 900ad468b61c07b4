"""What every part of the spec shares: strict models and Kubernetes-safe names."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["SLUG", "StrictModel"]


SLUG = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a DNS-1123 label: names become k8s objects


class StrictModel(BaseModel):
    """A spec model that refuses unknown fields (a typo is an error, not a silent default)."""

    model_config = ConfigDict(extra="forbid")
