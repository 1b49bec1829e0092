"""Linear probe: the frozen model unchanged, only the K-way head on its pooled output is trained (a reference row).

    logits (B, K) = W pool(M_frozen(x)) + b        W (K, d), b (K,)

kind ``"none"`` with no parameters of its own: the baseline every method is compared with (no paper's reading).
"""
from __future__ import annotations

from .base import Method, register_method


@register_method("linear-probe")
class LinearProbe(Method):
    default_lr = 1e-2  # it trains only its head, at this lr
    lr_grid = (3e-3, 1e-2, 3e-2)
    kind = "none"
