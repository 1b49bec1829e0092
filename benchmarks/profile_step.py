"""Where a table run's time goes: one training step of a real model, profiled; the matrix rates at its shape.

Prints (1) the median time of a training step of METHOD on a batch of 16 TASK examples around the median length
(one thread, as the accuracy table runs), (2) the torch profiler's ops by self CPU time, (3) the fp32 and bf16
rates of a product of the model's MLP shape (16 x 80 tokens, 576 -> 1536), and (4) the padding of the
evaluation batches (the validation split of 50 examples and the dev set, in sorted batches of 64 and of 16).

    OMP_NUM_THREADS=1 python benchmarks/profile_step.py lt-prefix rte
"""
from __future__ import annotations

import os
import random
import sys
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))


def main(method="lt-prefix", task="rte", model="smollm2-135m") -> None:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import ltuning
    from ltuning.data import collate, label_names_of, load_split, sorted_batches
    sys.path.insert(0, HERE)
    from accuracy import DATA
    from bench_train_step import product_rate

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    train = random.Random(0).sample(load_split(os.path.join(DATA, task), "train"), 200)
    clf = ltuning.Classifier(model, method)
    torch.manual_seed(0)
    clf.build(label_names_of(train))
    enc = clf.encode(train)
    order = sorted(range(len(enc.input_ids)), key=lambda i: len(enc.input_ids[i]))
    b = order[92:108]  # 16 examples around the median length
    ids, mask, lab = collate([enc.input_ids[i] for i in b], clf.model.tokenizer.pad_token_id, [enc.labels[i] for i in b])
    m = clf.model
    m.train()
    params = list(m.trainable_parameters())

    def step():
        loss, _ = m.loss(ids, mask, lab)
        loss.backward()
        for p in params:
            p.grad = None

    for _ in range(2):
        step()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    print(f"{model} {task} {method}: batch {tuple(ids.shape)}, step median {statistics.median(ts):.2f} s")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(3):
            step()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    fp32, bf16 = (1000 * product_rate(16 * 80, 576, 1536, dt, 20) for dt in (torch.float32, torch.bfloat16))
    print(f"matrix rate at 1280x576x1536: fp32 {fp32:.0f} GFLOP/s, bf16 {bf16:.0f} GFLOP/s")
    val = [len(x) for x in enc.input_ids[:50]]
    dev = [len(x) for x in clf.encode(load_split(os.path.join(DATA, task), "dev")).input_ids]
    for name, ls in (("validation (50)", val), ("dev", dev)):
        for bs in (64, 16):
            padded = sum(len(x) * max(ls[i] for i in x) for x in sorted_batches(ls, bs))
            print(f"{name}, batches of {bs}: computes {padded / sum(ls):.2f}x its real tokens")


if __name__ == "__main__":
    main(*sys.argv[1:])
