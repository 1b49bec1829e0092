"""Several processes with ``torch.distributed`` (``torchrun --nproc-per-node N -m ltuning train|eval|classify``).

Data parallel over the trainable parameters only. Every rank holds the whole frozen base (or its own FSDP2 shard
of it, see the README) and the same method + head. :func:`wrap_trainables` puts the trainables, and nothing
else, under PyTorch's ``DistributedDataParallel``: a small module that holds the method and the head (the frozen
base is never registered in it, its parameters and every buffer are on DDP's ignore list, so nothing frozen is
broadcast or all-reduced). Each training step still takes the single-process run's global batch ``b`` (same
seeded length-grouped order on every rank); rank r computes the loss of its contiguous slice ``b_r``
(:func:`local_slice`) scaled by ``|b_r| * W / |b|``: DDP averages gradients over the W ranks, so the gradient is
``(1/|b|) sum_{i in b} grad l_i``, the one of the single-process step, also when ``|b|`` does not divide by W (a
rank with nothing to do runs one row at weight 0 so that every rank joins the all-reduce). Validation, evaluation
and classification shard their inputs over ranks (:func:`map_sharded`) and gather the results in input order, so
every rank takes the same model-selection decisions; only rank 0 writes checkpoints, adapters, outputs and logs
(a decision that reads what rank 0 wrote, such as where to resume, is taken there and shared: :func:`on_main`).

Backends: ``gloo`` on the CPU, ``nccl`` when CUDA is available (the rank's device is ``cuda:LOCAL_RANK``).
Not bit-identical to one process: the ``pairwise`` objective samples its wrong labels per rank.
"""
from __future__ import annotations

import os
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn


def env_world_size() -> int:
    """WORLD_SIZE set by torchrun (1 without it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_from_env() -> bool:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT); True if distributed."""
    if env_world_size() <= 1 or not dist.is_available():
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def local_slice(batch: Sequence[int]) -> tuple[list, float]:
    """This rank's contiguous slice of a global batch and the loss weight ``|b_r| * W / |b|`` (see the module
    docstring); a rank left without rows gets the batch's first row at weight 0."""
    W, r, n = world_size(), rank(), len(batch)
    lo, hi = r * n // W, (r + 1) * n // W
    if hi > lo:
        return list(batch[lo:hi]), (hi - lo) * W / n
    return list(batch[:1]), 0.0


class _Trainables(nn.Module):
    """The method and head of an ``LTuningModel`` as the one module DDP wraps; ``forward(fn)`` returns ``fn()``
    (the loss), so the autograd graph DDP watches runs through the whole patched model."""

    def __init__(self, model):
        super().__init__()
        self.method = model.method
        self.head = model.head

    def forward(self, loss_fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        return loss_fn()


def wrap_trainables(model) -> nn.Module | None:
    """A ``DistributedDataParallel`` over ``model``'s method and head (the frozen base is not part of it), or None
    in a single process. Call it as ``ddp(lambda: loss)`` and backpropagate its output."""
    if not is_distributed():
        return None
    from torch.nn.parallel import DistributedDataParallel as DDP

    shell = _Trainables(model)
    frozen = [n for n, p in shell.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in shell.named_buffers()]  # label caches etc.: equal on every rank, never synced
    DDP._set_params_and_buffers_to_ignore_for_model(shell, frozen)
    dev = model.head.weight.device
    return DDP(shell, device_ids=[dev.index] if dev.type == "cuda" else None,
               find_unused_parameters=True)


def map_sharded(fn: Callable[[list], torch.Tensor], items: list) -> torch.Tensor:
    """``fn(items)`` computed over ranks: rank r runs ``fn`` on ``items[r::W]``, the rows are gathered back in input
    order on every rank (a float tensor (N, ...)). In a single process: ``fn(items)``."""
    if not is_distributed():
        return fn(items)
    W, r = world_size(), rank()
    if not items:
        return fn(items)
    mine = fn(items[r::W]) if items[r::W] else fn(items[:1])[:0]  # fewer items than ranks
    parts = [None] * W
    dist.all_gather_object(parts, mine.cpu())
    out = torch.empty((len(items), *mine.shape[1:]), dtype=mine.dtype)
    for k, part in enumerate(parts):
        out[k::W] = part
    return out


def on_main(fn: Callable[[], object]) -> object:
    """``fn()`` run on rank 0 only, its result (or the exception it raised) given to every rank: the other ranks
    return the same value or raise the same error. In a single process: ``fn()``."""
    if not is_distributed():
        return fn()
    box = [None, None]
    if is_main():
        try:
            box[0] = fn()
        except Exception as e:  # re-raised on every rank below
            box[1] = e
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return box[0]
