"""The micro-batcher's window policy (``ltuning/serving/batcher.py``) with a fake engine: which jobs share an
engine call, and when a lone request runs. Timings are generous (a loaded CI machine must not make them flaky):
every assertion compares against margins of 10x or more."""
from __future__ import annotations

import threading
import time

import torch

from ltuning.serving.batcher import Batcher


class FakeEngine:
    """score_ids sleeps ``seconds`` and records the inputs of each call."""

    def __init__(self, seconds: float = 0.0):
        self.seconds, self.calls = seconds, []

    def score_ids(self, adapter, ids):
        self.calls.append([x[0] for x in ids])
        time.sleep(self.seconds)
        return torch.tensor([[float(x[0]), 0.0] for x in ids])


class Adapter:
    rows_per_input = 1


AD = Adapter()  # one adapter: jobs of the same adapter may share an engine call


def wait_answer():
    ev, box = threading.Event(), {}

    def cb(scores, error):
        box["scores"], box["error"], box["t"] = scores, error, time.perf_counter()
        ev.set()
    return ev, box, cb


def test_a_lone_request_waits_max_idle_not_max_wait():
    eng = FakeEngine()
    b = Batcher(eng, max_batch_tokens=10_000, max_wait_ms=20_000, max_idle_ms=50)
    try:
        ev, box, cb = wait_answer()
        t0 = time.perf_counter()
        b.submit(AD, [[7, 1, 1]], cb)
        assert ev.wait(10), "never answered"
        assert box["error"] is None and box["scores"][0, 0].item() == 7.0
        assert box["t"] - t0 < 2.0, f"a lone job waited {box['t'] - t0:.2f} s (max_idle 0.05 s, max_wait 20 s)"
    finally:
        b.stop(10)


def test_without_idle_rule_a_lone_request_waits_max_wait():
    eng = FakeEngine()
    b = Batcher(eng, max_batch_tokens=10_000, max_wait_ms=600, max_idle_ms=None)
    try:
        ev, box, cb = wait_answer()
        t0 = time.perf_counter()
        b.submit(AD, [[3, 1]], cb)
        assert ev.wait(10)
        assert box["t"] - t0 >= 0.55, "max_wait was not honoured"
    finally:
        b.stop(10)


def test_jobs_queued_during_a_batch_wait_for_the_returning_clients():
    """Job 1 runs (1 s). Job 2 arrives meanwhile, so by job 1's answer it has waited longer than max_wait (0.4 s).
    Job 1's client re-posts (job 3) 20 ms after its answer. The window of job 2 opens at job 1's answer, so jobs 2
    and 3 run together: no convoy of two half-batches (had the window opened at job 2's arrival, job 2 would have
    run alone at once)."""
    eng = FakeEngine(seconds=1.0)
    b = Batcher(eng, max_batch_tokens=10_000, max_wait_ms=400, max_idle_ms=400)
    answered = threading.Event()
    done3 = threading.Event()
    try:
        def cb1(scores, error):
            def again():
                time.sleep(0.02)
                b.submit(AD, [[3, 1]], lambda s, e: done3.set())
            threading.Thread(target=again).start()
            answered.set()
        b.submit(AD, [[1, 1]], cb1)
        t_end = time.perf_counter() + 10
        while not eng.calls and time.perf_counter() < t_end:  # until job 1 is running
            time.sleep(0.005)
        b.submit(AD, [[2, 1]], lambda s, e: None)
        assert answered.wait(10) and done3.wait(10)
        assert eng.calls == [[1], [2, 3]], eng.calls
    finally:
        b.stop(10)


def test_a_full_token_budget_runs_at_once():
    eng = FakeEngine()
    b = Batcher(eng, max_batch_tokens=4, max_wait_ms=20_000, max_idle_ms=20_000)
    try:
        ev, box, cb = wait_answer()
        t0 = time.perf_counter()
        b.submit(AD, [[5, 1, 1, 1]], cb)  # 4 tokens: the budget
        assert ev.wait(10)
        assert box["t"] - t0 < 5.0
    finally:
        b.stop(10)
