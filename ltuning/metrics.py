"""Classification metrics: accuracy, macro-F1, Matthews correlation (the GLUE metric for CoLA)."""
from __future__ import annotations

import math


def classification_metrics(pred: list, gold: list, num_labels: int) -> dict:
    n = len(gold)
    if n == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "mcc": float("nan"), "n": 0}
    acc = sum(int(p == g) for p, g in zip(pred, gold)) / n
    f1s = []
    for c in range(num_labels):
        tp = sum(1 for p, g in zip(pred, gold) if p == c and g == c)
        fp = sum(1 for p, g in zip(pred, gold) if p == c and g != c)
        fn = sum(1 for p, g in zip(pred, gold) if p != c and g == c)
        f1s.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    # multi-class MCC (Gorodkin): (c*s - sum_k p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2))
    t = [sum(1 for g in gold if g == k) for k in range(num_labels)]
    p = [sum(1 for x in pred if x == k) for k in range(num_labels)]
    c = sum(int(a == b) for a, b in zip(pred, gold))
    den = math.sqrt((n * n - sum(x * x for x in p)) * (n * n - sum(x * x for x in t)))
    mcc = (c * n - sum(a * b for a, b in zip(p, t))) / den if den else 0.0
    return {"accuracy": acc, "macro_f1": sum(f1s) / num_labels, "mcc": mcc, "n": n}
