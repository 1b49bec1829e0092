"""LoRA (Hu et al. 2021) and CGC-LoRA (Song et al. 2024, "1+N" multi-task LoRA).

``lora`` -- every adapted Linear (``target_modules``, by leaf name; default q and v: ``q_proj, v_proj`` for
  Llama, ``query, value`` for BERT) computes ``h = W0 x + (alpha / r) B A x``, A (r, d_in) Kaiming-uniform,
  B (d_out, r) = 0 (PEFT's initialisation; no LoRA dropout). The frozen W0 is untouched: the low-rank term is
  added by a forward hook on the Linear.
``cgc-lora`` -- T tasks (``tasks``; none = one task). Each adapted Linear has E_s task-common experts and E_t
  task-specific experts per task (rank r each); a task-motivated gate mixes the common experts and the row's
  task's own experts::

      w^t = softmax(G e_t)  in R^{E_s + E_t}       e_t = task embedding (d_e), G (E_s + E_t, d_e) per Linear
      h   = W0 x + (alpha / r) sum_j w^t_j B_j A_j x

  Rows of one batch may belong to different tasks (``task_ids`` (B,) through ``LTuningModel.forward``). G is
  zero-initialised (uniform mixture at the start). Because the gate depends only on the task, task t's
  mixture is one dense delta-W per Linear: :meth:`LoRA.merge` folds it into the frozen weights (the "N" of
  1+N; :meth:`LoRA.unmerge` restores them bit for bit) and :meth:`LoRA.export` writes it as a standard PEFT
  LoRA adapter with rank = the sum of the mixed experts' ranks ((E_s + E_t) r), exact (no SVD): A = the
  stacked A_j, B = the side-by-side (alpha / r) w^t_j B_j, PEFT's lora_alpha = rank (scale 1).
  ``lora`` is the special case of one expert with weight 1.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch
from safetensors.torch import save_file
from torch import nn

from .base import Method, MethodConfig, register_method


@dataclass
class LoraConfig(MethodConfig):
    cli_help: ClassVar[dict] = {**MethodConfig.cli_help, 'r': 'LoRA rank (lora; per expert for cgc-lora)', 'lora_alpha': 'LoRA scale numerator: the update is (lora_alpha / r) B A x', 'target_modules': 'comma-separated leaf names of the Linears to adapt (default: q and v projections)'}
    r: int = 8
    lora_alpha: int = 16
    target_modules: Optional[list] = None

    def __post_init__(self):
        if isinstance(self.target_modules, str):  # "q_proj,v_proj" from the command line
            self.target_modules = [t.strip() for t in self.target_modules.split(",") if t.strip()]


@dataclass
class CGCLoraConfig(LoraConfig):
    cli_help: ClassVar[dict] = {**LoraConfig.cli_help, 'num_common_experts': 'cgc-lora: task-common experts E_s per adapted Linear', 'num_task_experts': 'cgc-lora: task-specific experts E_t per task per adapted Linear', 'task_embedding_dim': 'cgc-lora: size of the task embedding e_t that drives the gate'}
    r: int = 4
    tasks: list = field(default_factory=list)
    num_common_experts: int = 2
    num_task_experts: int = 1
    task_embedding_dim: int = 16


class Experts(nn.Module):
    """E rank-r LoRA experts of one Linear(d_in, d_out): A (E, r, d_in), B (E, d_out, r)."""

    def __init__(self, E: int, r: int, d_in: int, d_out: int):
        super().__init__()
        A = torch.empty(E, r, d_in)
        for e in range(E):
            nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(torch.zeros(E, d_out, r))

    def delta(self, x: torch.Tensor, coef: Optional[torch.Tensor]) -> torch.Tensor:
        """sum_e coef[b, e] B_e A_e x for x (B, L, d_in), coef (B, E) or None (all ones) -> (B, L, d_out)."""
        E, r, d_in = self.A.shape
        u = x @ self.A.reshape(E * r, d_in).T
        if coef is not None:
            u = u * coef.repeat_interleave(r, -1)[:, None, :]
        return u @ self.B.permute(1, 0, 2).reshape(-1, E * r).T

    def dense(self, w: torch.Tensor) -> torch.Tensor:
        """sum_e w_e B_e A_e, (d_out, d_in)."""
        return torch.einsum("e,eor,eri->oi", w, self.B, self.A)


def default_targets(info) -> list:
    return ["q_proj", "v_proj"] if info.causal else ["query", "value"]


@register_method("lora")
class LoRA(Method):
    config_class = LoraConfig
    kind = "none"

    def __init__(self, config: LoraConfig, info, base, tokenizer, cache=None):
        super().__init__(config, info, base, tokenizer, cache)
        targets = config.target_modules or default_targets(info)
        found = [(n, m) for n, m in base.named_modules()
                 if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets]
        if not found:
            raise ValueError(f"{config.method}: no nn.Linear named {targets} in {type(base).__name__}")
        self.module_names = [n for n, _ in found]
        self.target_names = sorted({n.rsplit(".", 1)[-1] for n in self.module_names})
        self._targets = [m for _, m in found]  # plain list: the frozen Linears are not part of the method
        self.base_name = getattr(base, "name_or_path", None)
        self.scaling = config.lora_alpha / config.r
        self.experts = nn.ModuleList(Experts(self.num_experts, config.r, m.in_features, m.out_features)
                                     for m in self._targets)
        for j, m in enumerate(self._targets):
            self.add_hook(m.register_forward_hook(self._hook(j)))
        self._saved_weights = None

    num_experts = 1

    def coefficients(self, j: int) -> Optional[torch.Tensor]:
        """(B, E) expert weights of each row of the current forward at Linear j (None: the single expert)."""
        return None

    def expert_weights(self, j: int, task: int) -> torch.Tensor:
        """(E,) expert weights of ``task`` at Linear j (0 for experts the task does not use)."""
        return torch.ones(1, device=self.experts[j].A.device)

    def task_experts(self, task: int) -> list:
        """Indices of the experts ``task`` mixes."""
        return [0]

    def _hook(self, j: int):
        def hook(module, args, out):
            if self._saved_weights is not None:  # merged into the frozen weights
                return out
            x = args[0].to(self.experts[j].A.dtype)
            return out + (self.scaling * self.experts[j].delta(x, self.coefficients(j))).to(out.dtype)
        return hook

    def delta_weight(self, j: int, task: int = 0) -> torch.Tensor:
        """Dense delta-W (d_out, d_in) of ``task`` at Linear j."""
        return self.scaling * self.experts[j].dense(self.expert_weights(j, task))

    @torch.no_grad()
    def merge(self, task: int = 0) -> None:
        """Fold ``task``'s delta-W into the frozen weights (inference only; the hooks pause until unmerge)."""
        if self._saved_weights is not None:
            raise RuntimeError("already merged; call unmerge() first")
        self._saved_weights = [m.weight.detach().clone() for m in self._targets]
        for j, m in enumerate(self._targets):
            m.weight += self.delta_weight(j, task).to(m.weight.dtype)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the frozen weights saved by :meth:`merge`."""
        for m, w in zip(self._targets, self._saved_weights):
            m.weight.copy_(w)
        self._saved_weights = None

    @torch.no_grad()
    def export(self, directory: str, task: int = 0) -> None:
        """Write ``task``'s adapter as a PEFT LoRA adapter (``adapter_model.safetensors`` + ``adapter_config.json``)."""
        idx = self.task_experts(task)
        tensors = {}
        for j, (name, ex) in enumerate(zip(self.module_names, self.experts)):
            w = self.expert_weights(j, task)[idx] * self.scaling
            tensors[f"base_model.model.{name}.lora_A.weight"] = ex.A[idx].reshape(-1, ex.A.shape[2]).contiguous()
            tensors[f"base_model.model.{name}.lora_B.weight"] = \
                (ex.B[idx] * w[:, None, None]).permute(1, 0, 2).reshape(ex.B.shape[1], -1).contiguous()
        rank = len(idx) * self.config.r
        cfg = {"peft_type": "LORA", "task_type": None, "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
               "target_modules": self.target_names, "bias": "none", "fan_in_fan_out": False,
               "inference_mode": True, "base_model_name_or_path": self.base_name}
        os.makedirs(directory, exist_ok=True)
        save_file({k: v.float().cpu() for k, v in tensors.items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump(cfg, f, indent=2)

    def uninstall(self) -> None:
        if self._saved_weights is not None:
            self.unmerge()
        super().uninstall()


@register_method("cgc-lora")
class CGCLoRA(LoRA):
    config_class = CGCLoraConfig

    def __init__(self, config: CGCLoraConfig, info, base, tokenizer, cache=None):
        T, Es, Et = max(1, len(config.tasks)), config.num_common_experts, config.num_task_experts
        if Es < 0 or Et < 0 or Es + Et < 1:
            raise ValueError(f"cgc-lora needs at least one expert (num_common_experts={Es}, num_task_experts={Et})")
        self.num_tasks, self.num_experts = T, Es + T * Et
        super().__init__(config, info, base, tokenizer, cache)
        self.task_embedding = nn.Embedding(T, config.task_embedding_dim)
        self.gates = nn.ModuleList(nn.Linear(config.task_embedding_dim, Es + Et) for _ in self._targets)
        for g in self.gates:
            nn.init.zeros_(g.weight)
            nn.init.zeros_(g.bias)
        # expert_index[t] = global indices of the experts task t mixes: the common ones, then its own
        own = Es + torch.arange(T)[:, None] * Et + torch.arange(Et)[None]
        self.register_buffer("expert_index", torch.cat([torch.arange(Es).expand(T, Es), own], 1), persistent=False)
        self._task_ids = None

    def begin_forward(self, input_ids, attention_mask, task_ids=None, **batch) -> None:
        if task_ids is None:
            if self.num_tasks > 1:
                raise ValueError(f"cgc-lora with {self.num_tasks} tasks needs task_ids (B,) in the forward")
            task_ids = torch.zeros(input_ids.shape[0], dtype=torch.long)
        self._task_ids = task_ids.to(input_ids.device).long()

    def mixture(self, j: int, task_ids: torch.Tensor) -> torch.Tensor:
        """w^t = softmax(G_j e_t), (B, E_s + E_t)."""
        return torch.softmax(self.gates[j](self.task_embedding(task_ids)), -1)

    def coefficients(self, j: int) -> torch.Tensor:
        w = self.mixture(j, self._task_ids)
        coef = torch.zeros(w.shape[0], self.num_experts, device=w.device, dtype=w.dtype)
        return coef.scatter(1, self.expert_index[self._task_ids], w)

    def expert_weights(self, j: int, task: int) -> torch.Tensor:
        t = torch.tensor([task], device=self.task_embedding.weight.device)
        w = self.mixture(j, t)[0]
        return torch.zeros(self.num_experts, device=w.device, dtype=w.dtype).scatter(0, self.expert_index[task], w)

    def task_experts(self, task: int) -> list:
        return self.expert_index[task].tolist()
