"""The optimizer step alone: torch's default AdamW (a per-tensor loop on the CPU), ``foreach=True`` and the fused
kernel (``ltuning.train.make_optimizer``'s choice) over the real trainables of a configuration.

For each (model, K, configuration) of ``bench_scoring.py`` (same model build, same label texts) the trainables get
seeded gradients once, then each optimizer takes one untimed step and ``--reps`` timed steps (median, ms). Nothing
else runs in the timed region, so the difference between the columns is what the choice of implementation costs a
training step of that configuration (the whole steps: ``bench_scoring.py``'s ``:optimizer=default`` rows).

    OMP_NUM_THREADS=1 python benchmarks/train_step/bench_optimizer.py --json benchmarks/results/optimizer_step.json
"""
from __future__ import annotations

import argparse
import datetime
import os
import sys

sys.path[:0] = [os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
from common import RESULTS, ROOT, atomic_json, cpu_name, git_commit, group, median_ms  # noqa: E402

group("serving")
from bench_scoring import TASKS, load_task, make_model  # noqa: E402

sys.path.insert(0, ROOT)

VARIANTS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def time_variants(params, reps: int) -> dict:
    """Median ms of one AdamW step over ``params`` (their ``.grad`` set) for each of :data:`VARIANTS`."""
    import torch
    out = {}
    for name, kw in VARIANTS.items():
        clones = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for c, p in zip(clones, params):
            c.grad = p.grad.clone()
        opt = torch.optim.AdamW(clones, lr=1e-4, **kw)
        out[name] = median_ms(opt.step, reps)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="minilm-l6:2:onepass,minilm-l6:2:kpass,minilm-l6:2:lora,minilm-l6:77:onepass,"
                    "smollm2-135m:2:onepass,smollm2-135m:77:onepass,smollm2-135m:2:lora",
                    help="MODEL:K:CONFIG triples (configurations as in bench_scoring.py)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--json", default=os.path.join(RESULTS, "optimizer_step.json"))
    a = ap.parse_args()
    runs = [item.split(":", 2) for item in a.runs.split(",")]
    for item, parts in zip(a.runs.split(","), runs):
        if len(parts) != 3 or not parts[1].isdigit() or int(parts[1]) not in TASKS:
            print(f"bench_optimizer.py: --runs: expected MODEL:K:CONFIG with K one of {sorted(TASKS)}, got {item!r}",
                  file=sys.stderr)
            sys.exit(2)
    import torch

    from ltuning.data import label_names_of
    from ltuning.models import load_base
    rows = []
    for m, k, c in runs:
        base, tok = load_base(m)
        torch.manual_seed(0)
        model = make_model(c, base, tok, label_names_of(load_task(int(k))))
        params = list(model.trainable_parameters())
        for p in params:
            p.grad = torch.randn_like(p)
        ms = time_variants(params, a.reps)
        rows.append({"model": m, "K": int(k), "config": c, "tensors": len(params),
                     "trainables": sum(p.numel() for p in params), "step_ms": ms,
                     "fused_speedup_over_default": ms["default"] / ms["fused"]})
        print(f"{m:13s} K={k:<3s} {c:8s} {rows[-1]['trainables']:>10,d} trainables in {len(params):3d} tensors: "
              + "  ".join(f"{n} {v:7.2f} ms" for n, v in ms.items())
              + f"  (fused {rows[-1]['fused_speedup_over_default']:.1f}x default)", flush=True)
    cmd = "OMP_NUM_THREADS={} python benchmarks/train_step/bench_optimizer.py {}".format(
        os.environ.get("OMP_NUM_THREADS", "?"), " ".join(sys.argv[1:]))
    atomic_json(a.json, {"command": cmd, "git_commit": git_commit(ROOT), "cpu": cpu_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(), "reps": a.reps, "rows": rows})
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
