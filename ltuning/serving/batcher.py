"""Dynamic micro-batching: requests queue up (bounded), one worker thread runs them through the engine in groups.

A request is a job of N tokenised inputs for one adapter. When the worker is free it takes the oldest job and
opens a *batching window* for it, which closes at the first of:

* the queued jobs that can run with it hold ``max_batch_tokens`` scored tokens (real tokens x rows per input);
* ``max_wait_ms`` have passed since the window opened;
* ``max_idle_ms`` have passed without a new job arriving (no more requests are coming: don't wait for nothing).

The window opens at the later of the oldest job's arrival and the moment the previous batch was answered. The
second matters under load: clients answered by one batch send their next requests a few milliseconds later; had
the jobs that queued during the batch left at once (they have waited longer than ``max_wait_ms`` already), the
returning clients would form the next batch of their own, and the load would split into small batches that stay
split (a convoy). So a job waits at most ``max_wait_ms`` after it could first have run, and a lone request (one
client) waits only ``max_idle_ms``.

The worker then takes those jobs (FIFO, whole jobs, at least one), runs them as one engine call (which plans its
own token-budget forwards) and answers each job with its own rows, in its own order. Jobs that can run together:
those of the same adapter (:meth:`Engine.score_ids`), and those of any adapters that share the engine's prefix bank
(:meth:`Engine.shares`; one :meth:`Engine.score_mixed` call, mixed batches). Other jobs stay queued for the next
round.

Bounded: ``submit`` raises :class:`QueueFull` when the examples waiting would exceed ``max_queue_examples`` (the
server answers 503 with Retry-After), so memory stays bounded under overload. ``stop()`` lets the worker finish
every queued job, then joins it (graceful shutdown).
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field

import torch


class QueueFull(Exception):
    pass


@dataclass
class Job:
    adapter: object          # engine Adapter
    ids: list                # token id lists
    callback: object         # callback(scores (N, K) tensor or None, error or None), called on the worker thread
    tokens: int
    t_enqueue: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(self, engine, max_batch_tokens: int = 4096, max_wait_ms: float = 20.0,
                 max_queue_examples: int = 4096, on_batch=None, max_idle_ms: float | None = 5.0):
        self.engine = engine
        self.max_batch_tokens = max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_idle = None if max_idle_ms is None else max_idle_ms / 1000.0
        self.t_answered = 0.0      # when the previous batch was answered (perf_counter)
        self.t_arrival = 0.0       # when the newest job arrived
        self.max_queue_examples = max_queue_examples
        self.on_batch = on_batch  # on_batch(examples, tokens, seconds) for metrics
        self.queue: collections.deque = collections.deque()
        self.pending = 0  # examples queued, not yet taken by the worker
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="ltuning-batcher", daemon=True)
        self.thread.start()

    def submit(self, adapter, ids: list, callback) -> None:
        job = Job(adapter, ids, callback, sum(len(x) for x in ids) * adapter.rows_per_input)
        with self.cond:
            if self.stopping:
                raise QueueFull("shutting down")
            if self.pending + len(ids) > self.max_queue_examples:
                raise QueueFull(f"{self.pending} examples queued (limit {self.max_queue_examples})")
            self.queue.append(job)
            self.pending += len(ids)
            self.t_arrival = job.t_enqueue
            self.cond.notify()

    def depth(self) -> int:
        return self.pending

    def _take(self) -> list | None:
        with self.cond:
            while not self.queue:
                if self.stopping:
                    return None
                self.cond.wait()
            first = self.queue[0]
            opened = max(first.t_enqueue, self.t_answered)
            deadline = opened + self.max_wait
            while True:
                same = [j for j in self.queue if self._together(j.adapter, first.adapter)]
                if sum(j.tokens for j in same) >= self.max_batch_tokens or self.stopping:
                    break
                close = deadline
                if self.max_idle is not None:
                    close = min(close, max(opened, self.t_arrival) + self.max_idle)
                left = close - time.perf_counter()
                if left <= 0:
                    break
                self.cond.wait(left)
            taken, tokens = [], 0
            for j in list(self.queue):
                if not self._together(j.adapter, first.adapter):
                    continue
                if taken and tokens + j.tokens > self.max_batch_tokens:
                    break
                taken.append(j)
                tokens += j.tokens
            for j in taken:
                self.queue.remove(j)
                self.pending -= len(j.ids)
            return taken

    def _together(self, a, b) -> bool:
        """Jobs of adapters ``a`` and ``b`` can share an engine call."""
        if a is b:
            return True
        shares = getattr(self.engine, "shares", None)
        return shares is not None and shares(a) and shares(b)

    def _score(self, jobs: list, ids: list):
        """Scores of the taken jobs' inputs: one tensor, or (mixed adapters) one (K_a,) tensor per input."""
        if all(j.adapter is jobs[0].adapter for j in jobs):
            return self.engine.score_ids(jobs[0].adapter, ids)
        return self.engine.score_mixed([j.adapter for j in jobs for _ in j.ids], ids)

    def _run(self) -> None:
        while True:
            jobs = self._take()
            if jobs is None:
                return
            ids = [x for j in jobs for x in j.ids]
            t0 = time.perf_counter()
            try:
                scores = self._score(jobs, ids)
            except Exception as e:  # answered as a 500 per request; the worker keeps serving
                for j in jobs:
                    j.callback(None, e)
                self.t_answered = time.perf_counter()
                continue
            if self.on_batch:
                self.on_batch(len(ids), sum(j.tokens for j in jobs), time.perf_counter() - t0)
            start = 0
            for j in jobs:
                part = scores[start:start + len(j.ids)]
                j.callback(part if isinstance(part, torch.Tensor) else torch.stack(part), None)
                start += len(j.ids)
            self.t_answered = time.perf_counter()

    def stop(self, timeout: float | None = None) -> None:
        """Answer every queued job, then stop the worker."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout)
