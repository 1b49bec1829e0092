"""Linear probe: the frozen model unchanged, only the K-way head on its pooled output is trained (a reference row)."""
from __future__ import annotations

from .base import Method, register_method


@register_method("linear-probe")
class LinearProbe(Method):
    kind = "none"
