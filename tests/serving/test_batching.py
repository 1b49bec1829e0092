"""The one batch planner (``ltuning.batching.plan_batches``): every input once, the limits kept, the least cost
(checked against a brute force over every split of the sorted order), ties broken as asked."""
from __future__ import annotations

import itertools
import random

import pytest

from ltuning.batching import plan_batches


def _cost(batches, lengths, rows, overhead):
    return sum(len(b) * lengths[b[0]] * rows + overhead for b in batches)


def _brute_force(lengths, max_inputs, rows, overhead, max_tokens):
    """The least cost over every split of the sorted lengths into consecutive batches within the limits."""
    ls, n = sorted(lengths, reverse=True), len(lengths)
    best = None
    for k in range(n):
        for cut in itertools.combinations(range(1, n), k):
            spans = list(zip((0,) + cut, cut + (n,)))
            if any(e - s > max_inputs or (e - s > 1 and (e - s) * ls[s] * rows > max_tokens) for s, e in spans):
                continue
            c = sum((e - s) * ls[s] * rows + overhead for s, e in spans)
            best = c if best is None else min(best, c)
    return best


@pytest.mark.parametrize("ties", ["larger", "smaller"])
def test_plan_is_optimal_within_the_limits(seed, ties):
    rng = random.Random(seed)
    for _ in range(40):
        n, rows = rng.randint(1, 9), rng.choice([1, 2, 3])
        max_rows, overhead = rng.randint(1, 12), rng.choice([0, 3, 20, 200])
        max_tokens = rng.choice([None, 40, 150, 10_000])
        lengths = [rng.randint(1, 60) for _ in range(n)]
        batches = plan_batches(lengths, max_rows, overhead, rows, max_tokens, ties=ties)
        flat = [i for b in batches for i in b]
        assert sorted(flat) == list(range(n))
        assert [lengths[i] for i in flat] == sorted(lengths, reverse=True)
        max_inputs = max(1, max_rows // rows)
        for b in batches:
            assert 1 <= len(b) <= max_inputs
            if len(b) > 1 and max_tokens is not None:
                assert len(b) * lengths[b[0]] * rows <= max_tokens
        want = _brute_force(lengths, max_inputs, rows, overhead, max_tokens if max_tokens is not None else 1 << 60)
        assert _cost(batches, lengths, rows, overhead) == want


def test_ties_and_plain_chunks():
    # [6 4] costs 2 x 6 + 2 = 14 = 6 + 4 + 2 x 2, the cost of [6] [4]: ties decide the last batch's size
    assert plan_batches([6, 4], 2, 2, ties="larger") == [[0, 1]]
    assert plan_batches([6, 4], 2, 2, ties="smaller") == [[0], [1]]
    assert plan_batches([4, 6], 2, 1) == [[1], [0]]  # 6 + 4 + 2 < 12 + 1: no tie, longest first
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(50)]
    assert [len(b) for b in plan_batches(lengths, 16)] == [16, 16, 16, 2]  # no overhead: plain sorted chunks
    assert [len(b) for b in plan_batches(lengths, 16, rows_per_input=3)] == [5] * 10  # 16 rows hold 5 inputs
    assert plan_batches([500, 3], 64, 0, max_tokens=100) == [[0], [1]]  # over the budget alone
    with pytest.raises(ValueError):
        plan_batches([3], 0)
    with pytest.raises(ValueError):
        plan_batches([3], 4, ties="first")


def test_mixed_rows_plan_is_optimal_and_equals_the_uniform_plan(seed):
    """Per-input row counts (a mixed batch of adapters, K rows for a K-pass label-conditioned one): every input
    once, at most ``max_rows`` rows and ``max_tokens`` padded tokens per batch (a lone input excepted), the least
    cost over every split of the sorted order; with equal counts the plan of the uniform planner."""
    rng = random.Random(seed)
    for _ in range(40):
        n = rng.randint(1, 8)
        rows = [rng.choice([1, 2, 3]) for _ in range(n)]
        max_rows, overhead = rng.randint(1, 12), rng.choice([0, 3, 20, 200])
        max_tokens = rng.choice([None, 40, 150, 10_000])
        lengths = [rng.randint(1, 60) for _ in range(n)]
        batches = plan_batches(lengths, max_rows, overhead, rows, max_tokens, ties="smaller")
        assert sorted(i for b in batches for i in b) == list(range(n))
        order = sorted(range(n), key=lambda i: -lengths[i])
        assert [i for b in batches for i in b] == order
        for b in batches:
            r = sum(rows[i] for i in b)
            assert len(b) == 1 or (r <= max_rows and (max_tokens is None or r * lengths[b[0]] <= max_tokens))
        cost = sum(sum(rows[i] for i in b) * lengths[b[0]] + overhead for b in batches)
        best = None
        for k in range(n):
            for cut in itertools.combinations(range(1, n), k):
                spans = [order[s:e] for s, e in zip((0,) + cut, cut + (n,))]
                if any(len(sp) > 1 and (sum(rows[i] for i in sp) > max_rows or (
                        max_tokens is not None and sum(rows[i] for i in sp) * lengths[sp[0]] > max_tokens))
                       for sp in spans):
                    continue
                c = sum(sum(rows[i] for i in sp) * lengths[sp[0]] + overhead for sp in spans)
                best = c if best is None else min(best, c)
        assert cost == best
        same = rng.choice([1, 2, 3])
        for ties in ("larger", "smaller"):
            assert plan_batches(lengths, max_rows, overhead, [same] * n, max_tokens, ties) == \
                plan_batches(lengths, max_rows, overhead, same, max_tokens, ties)


def _old_plan_batches(lengths, max_rows, overhead_tokens=None, rows_per_input=1, max_tokens=None, ties="larger"):
    """The oracle: ``plan_batches`` for an int ``rows_per_input`` as it was before the uniform and the per-input-rows
    planners became one (commit 272af27), copied unchanged."""
    if max_rows < 1 or rows_per_input < 1 or (max_tokens is not None and max_tokens < 1):
        raise ValueError("max_rows, rows_per_input and max_tokens must be >= 1")
    if ties not in ("larger", "smaller"):
        raise ValueError(f"ties: expected 'larger' or 'smaller', got {ties!r}")
    larger = ties == "larger"
    idx = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    n = len(idx)
    max_inputs = max(1, max_rows // rows_per_input)
    if (overhead_tokens is None and max_tokens is None) or n <= 1:
        return [idx[j:j + max_inputs] for j in range(0, n, max_inputs)]
    overhead = overhead_tokens or 0
    ls = [lengths[i] for i in idx]
    best = [0.0] + [float("inf")] * n  # best[j]: least cost of the first j sorted inputs
    start = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, max(0, j - max_inputs) - 1, -1):  # last batch = sorted inputs i..j-1, padded to ls[i]
            tokens = (j - i) * ls[i] * rows_per_input
            if max_tokens is not None and tokens > max_tokens and i < j - 1:
                break  # longer batches (smaller i) only hold more tokens
            c = best[i] + tokens + overhead
            if c < best[j] or (larger and c == best[j]):  # i descends: a tie taken = a larger last batch
                best[j], start[j] = c, i
    out, j = [], n
    while j > 0:
        out.append(idx[start[j]:j])
        j = start[j]
    return out[::-1]


def test_uniform_rows_plan_equals_the_former_uniform_planner(seed):
    """An int ``rows_per_input`` now runs the per-input-rows programme with ``[rows_per_input] * n``: the plan must
    be the former uniform planner's (the oracle above) to the index, for both tie rules, with and without overhead
    and token budget, over many lengths (ties in length included), 0 to 120 inputs and budgets from below one
    input's rows up to more than all of them; several seeds, each named in a failure."""
    for s in range(seed, seed + 8):
        rng = random.Random(s)
        for case in range(12):
            n = rng.choice([0, 1, 2, rng.randint(3, 20), rng.randint(20, 120)])
            rows = rng.choice([1, 1, 2, 3, 4, 7])
            max_rows = rng.choice([1, rows - 1 or 1, rows, rng.randint(1, 64), 4096])
            overhead = rng.choice([None, 0, 1, 3, 20, 200, 2000])
            max_tokens = rng.choice([None, 1, 40, 150, 1000, 10_000])
            top = rng.choice([3, 60, 512])  # few distinct lengths: many equal-cost splits
            lengths = [rng.randint(1, top) for _ in range(n)]
            for ties in ("larger", "smaller"):
                args = (lengths, max_rows, overhead, rows, max_tokens, ties)
                want = _old_plan_batches(*args)
                assert plan_batches(*args) == want, f"seed {s} case {case}: {args}"
    with pytest.raises(ValueError):  # a bad int rows_per_input is refused even with no inputs
        plan_batches([], 4, rows_per_input=0)
    with pytest.raises(ValueError):
        plan_batches([5, 3], 4, 2, rows_per_input=[1])  # one row count per input
