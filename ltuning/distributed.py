"""Several processes with ``torch.distributed`` (``torchrun --nproc-per-node N -m ltuning train|eval|classify``).

Data parallel over the trainable parameters only. Every rank holds the whole frozen base (or, with ``--fsdp``, its
own FSDP2 shard of the base's transformer layers: :func:`shard_frozen_base`) and the same method + head.
:func:`wrap_trainables` puts the trainables, and nothing else, under PyTorch's ``DistributedDataParallel``: a small
module that holds the method and the head (the frozen base is never registered in it, its parameters and every
buffer are on DDP's ignore list, so nothing frozen is broadcast or all-reduced). Each training step still takes the
single-process run's global batch ``b`` (same seeded length-grouped order on every rank); rank r computes the loss
of its contiguous slice ``b_r`` (:func:`local_slice`) scaled by ``|b_r| * W / |b|``: DDP averages gradients over the
W ranks, so the gradient is ``(1/|b|) sum_{i in b} grad l_i``, the one of the single-process step, also when ``|b|``
does not divide by W (a rank with nothing to do runs one row at weight 0 so that every rank joins the all-reduce).
Validation, evaluation and classification shard their inputs over ranks (:func:`map_sharded`) and gather the results
in input order, so every rank takes the same model-selection decisions; only rank 0 writes checkpoints, adapters,
outputs and logs (a decision that reads what rank 0 wrote, such as where to resume, is taken there and shared:
:func:`on_main`).

Backends: ``gloo`` on the CPU, ``nccl`` when CUDA is available (the rank's device is ``cuda:LOCAL_RANK``).
Not bit-identical to one process: the ``pairwise`` objective samples its wrong labels per rank.

FSDP2 (``ltuning train --fsdp``, :func:`shard_frozen_base`): for a base that does not fit one device, each
transformer layer of the frozen base is ``torch.distributed.fsdp.fully_shard``-ed over the W ranks: rank r keeps
rows ``[r ceil(n/W), (r+1) ceil(n/W))`` of dim 0 of every layer weight (a ``DTensor``), and the layer's forward
pre-hook all-gathers the W shards just before the layer runs (again before its backward); the full weights are
freed after it. The frozen weights have no gradient, so nothing is reduce-scattered: the trainables (method +
head, never sharded, ``ignored_params``) stay replicated under the DDP above. The embeddings, the final norm and
the pooler stay replicated too (plain tensors: the embedding table is read outside the base's forward by prompt
methods, fingerprints and label encoding). Every base forward then joins W collectives, so the ranks must run the
same number of forwards: sharded scoring (:func:`map_sharded` with ``lockstep=True``) scores every input on every
rank instead of a slice. FSDP2 gathers a layer for its backward when the gradient reaches the layer's output; K/V
captured from inside a layer's attention (:func:`ltuning.models.capture_kv`) leave it another way and go through
:func:`gather_in_backward`.
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


def map_sharded(fn: Callable[[list], torch.Tensor], items: list, lockstep: bool = False) -> torch.Tensor:
    """``fn(items)`` computed over ranks: rank r runs ``fn`` on ``items[r::W]``, the rows are gathered back in input
    order on every rank (a float tensor (N, ...)). In a single process: ``fn(items)``. ``lockstep``: every rank
    runs ``fn(items)`` whole (an FSDP-sharded base, :func:`is_sharded`: each forward all-gathers weights with the
    other ranks, so they must run the same forwards)."""
    if not is_distributed() or lockstep:
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


# ------------------------------------------------------------------------------------------------------------
# FSDP2: the frozen base's transformer layers sharded over the ranks

def is_sharded(model) -> bool:
    """True when ``model`` (an ``LTuningModel``) has its frozen base sharded by :func:`shard_frozen_base`."""
    return bool(getattr(model, "_ltuning_fsdp", None))


def _local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores of ``p``: its local shard for a DTensor (FSDP2), else all of them."""
    local = getattr(p, "to_local", None)
    return local().numel() if callable(local) else p.numel()


def frozen_shard_sizes(model) -> dict:
    """Frozen base parameters stored by each rank: ``{"total": N, "per_rank": [n_0, ..., n_{W-1}],
    "sharded_total": S}``, S the elements of the sharded layers (the rest, N - S, is replicated on every rank, so
    n_r = (N - S) + S_r with sum_r S_r = S). Collective under torchrun (every rank must call it)."""
    frozen = [p for p in model.base.parameters() if not p.requires_grad]
    total = sum(p.numel() for p in frozen)
    sharded = sum(p.numel() for p in frozen if hasattr(p, "to_local"))
    mine = sum(_local_numel(p) for p in frozen)
    if is_distributed():
        sizes = [None] * world_size()
        dist.all_gather_object(sizes, mine)
    else:
        sizes = [mine]
    return {"total": total, "sharded_total": sharded, "per_rank": sizes}


def shard_frozen_base(model) -> dict:
    """FSDP2 over the frozen base of ``model`` (an ``LTuningModel``, before its optimizer is built), in place.

    ``fully_shard`` on every transformer layer (one all-gather group per layer: rank r stores 1/W of dim 0 of each
    weight) and then on the base itself, as the root that drives the layers (its own parameters, embeddings and
    final norm, are ``ignored_params``: replicated plain tensors). Trainable parameters anywhere in the base are
    ignored too (the method's, which DDP all-reduces). On GPUs (nccl) the mesh is ``cuda`` and each rank's shards
    move to ``cuda:LOCAL_RANK`` with the replicated parts, the method and the head; on the CPU (gloo) it is
    ``cpu``. Refused (:class:`~ltuning.errors.UserError`) outside torchrun and on a bitsandbytes-quantized base.
    Returns :func:`frozen_shard_sizes`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from .errors import UserError
    from .methods.layers import transformer_layers
    from .models.quantize import quantization_of

    if not is_distributed():
        raise UserError("FSDP2 shards the frozen base over several processes; run under torchrun "
                        "--nproc-per-node N (N >= 2)", "--fsdp")
    if quantization_of(model.base):
        raise UserError("FSDP2 does not shard bitsandbytes-quantized weights here; use --quantize with plain "
                        "data parallel (each rank holds a quantized copy), or --fsdp with a full-precision base",
                        "--fsdp")
    if is_sharded(model):
        return frozen_shard_sizes(model)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    mesh = init_device_mesh(device.type, (world_size(),))
    base = model.base
    layers = list(transformer_layers(base))
    trainable = {p for p in base.parameters() if p.requires_grad}
    in_layers = {id(m) for layer in layers for m in layer.modules()}
    if cuda:  # the replicated parts go to the rank's device; fully_shard moves the layer shards there
        for m in base.modules():
            if id(m) not in in_layers:
                m._apply(lambda t: t.to(device), recurse=False)
        model.method.to(device)
        model.head.to(device)
    for layer in layers:
        fully_shard(layer, mesh=mesh, ignored_params={p for p in layer.parameters() if p in trainable} or None)
        for m in layer.modules():  # the attention modules: captured K/V gather their layer again in backward
            if hasattr(m, "layer_idx"):
                m.__dict__["_ltuning_fsdp_layer"] = layer  # in __dict__: a reference, not a submodule
    layer_params = {p for layer in layers for p in layer.parameters()}
    root_own = {p for p in base.parameters() if p not in layer_params} | trainable
    fully_shard(base, mesh=mesh, ignored_params=root_own or None)
    model._ltuning_fsdp = True
    return frozen_shard_sizes(model)


class _GatherInBackward(torch.autograd.Function):
    """Identity on tensors; its backward all-gathers ``layer`` (an FSDP2 module) before the gradient goes on."""

    @staticmethod
    def forward(ctx, layer, *tensors):
        ctx.layer = layer
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.layer.unshard()  # a no-op when its weights are gathered already
        return (None, *grads)


def gather_in_backward(layer, *tensors) -> tuple:
    """``tensors`` (produced inside the FSDP2-sharded ``layer``) through an identity whose backward gathers the
    layer's weights again. FSDP2 gathers a layer for its backward when the gradient reaches the layer's OUTPUT; a
    tensor that leaves the layer another way (the K/V that ``capture_kv`` takes from inside the attention, e.g. a
    prompt bank's K/V used as the next forward's prefix) would otherwise be backpropagated through freed weights
    ("storage of size 0", or DTensor weights in a gradient-checkpointing recompute)."""
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors):
        return tensors
    return _GatherInBackward.apply(layer, *tensors)
