"""Batches of inputs of similar length: one planner for inference, one shuffler for training.

* :func:`plan_batches` (inference: evaluation, ``Classifier.predict``, the serving engine). Inputs are sorted by
  length, longest first; a batch of the sorted inputs ``i..j-1`` costs its padded tokens
  ``(j - i) * lengths[i] * rows_per_input`` (label-conditioned methods score every input against all K labels:
  K rows per input) plus ``overhead_tokens``, the fixed cost of one forward pass counted in tokens (reading every
  weight once). The split into consecutive batches that minimises the total cost is found exactly by dynamic
  programming in O(n * max_inputs), where a batch holds at most ``max_inputs = max(1, max_rows // rows_per_input)``
  inputs and at most ``max_tokens`` padded tokens (an input longer than the budget alone gets its own batch).
  Among splits of equal cost, ``ties="larger"`` takes the one whose last batch is the largest, ``"smaller"`` the
  smallest (evaluation and ``Classifier`` use the first, the serving engine the second: the choice changes scores
  only by float round-off, kept so that each path's scores stay bit-identical). Without ``overhead_tokens`` (and budget): consecutive chunks of
  ``max_inputs`` sorted inputs. ``packed=True`` (batches that run packed, :mod:`ltuning.models.packing`): a batch
  costs and is bounded by its real tokens instead of its padded ones. Per-input row counts (a list
  ``rows_per_input``) run the same programme with a batch bounded by the sum of its rows (the uniform case is the
  list ``[rows_per_input] * n``).
* :func:`length_grouped_batches` (training): seeded shuffled batches whose inputs have similar lengths.

Both return lists of input indices; callers restore the input order.
"""
from __future__ import annotations

import random


def plan_batches(lengths: list, max_rows: int, overhead_tokens: int | None = None, rows_per_input=1,
                 max_tokens: int | None = None, ties: str = "larger", packed: bool = False) -> list:
    """Batches of indices into ``lengths`` (lists), longest inputs first; see the module docstring.
    ``rows_per_input``: an int (every input), or a list with each input's own rows (a mixed batch of adapters,
    :mod:`ltuning.serving.shared_bank`). One dynamic programme for both: a batch of the sorted inputs ``i..j-1``
    holds ``r = rows[i] + ... + rows[j-1]`` rows, at most ``max_rows`` (one input at least), costs
    ``r * lengths[i] + overhead_tokens`` and holds at most ``max_tokens`` of those padded tokens (a lone input
    excepted); with an int, ``r = (j - i) * rows_per_input``: at most ``max(1, max_rows // rows_per_input)``
    inputs. ``packed``: the batch runs packed (:mod:`ltuning.models.packing`), so it costs and is bounded by its
    real tokens ``rows[i] * lengths[i] + ... + rows[j-1] * lengths[j-1]`` instead of its padded ones."""
    uniform = isinstance(rows_per_input, int)
    rows = [rows_per_input] * len(lengths) if uniform else list(rows_per_input)
    if max_rows < 1 or (uniform and rows_per_input < 1) or len(rows) != len(lengths) or any(r < 1 for r in rows) \
            or (max_tokens is not None and max_tokens < 1):
        raise ValueError("max_rows, rows_per_input (every input's rows, one per input) and max_tokens must be >= 1")
    if ties not in ("larger", "smaller"):
        raise ValueError(f"ties: expected 'larger' or 'smaller', got {ties!r}")
    larger = ties == "larger"
    idx = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(idx)
    ls = [lengths[i] for i in idx]
    cum = [0]  # cum[j]: rows of the first j sorted inputs
    real = [0]  # real[j]: real tokens of the first j sorted inputs (over all their rows)
    for i in idx:
        cum.append(cum[-1] + rows[i])
        real.append(real[-1] + rows[i] * lengths[i])
    if (overhead_tokens is None and max_tokens is None) or n <= 1:
        out, i = [], 0
        while i < n:  # greedy chunks of at most max_rows rows (one input at least)
            j = i + 1
            while j < n and cum[j + 1] - cum[i] <= max_rows:
                j += 1
            out.append(idx[i:j])
            i = j
        return out
    overhead = overhead_tokens or 0
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j sorted inputs
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):  # last batch = sorted inputs i..j-1, padded to ls[i]
            r = cum[j] - cum[i]
            tokens = real[j] - real[i] if packed else r * ls[i]
            if i < j - 1 and (r > max_rows or (max_tokens is not None and tokens > max_tokens)):
                break  # smaller i only adds rows and tokens
            c = best[i] + tokens + overhead
            if c < best[j] or (larger and c == best[j]):  # i descends: a tie taken = a larger last batch
                best[j], start[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(idx[start[j]:j])
        j = start[j]
    return out[::-1]


def length_grouped_batches(lengths: list, batch_size: int, rng: random.Random, mega: int = 50) -> list:
    """Shuffled batches of indices whose lengths are similar (sorted within mega-batches of ``mega`` batches)."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches = []
    step = batch_size * mega
    for s in range(0, len(idx), step):
        chunk = sorted(idx[s:s + step], key=lambda i: -lengths[i])
        batches += [chunk[j:j + batch_size] for j in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
