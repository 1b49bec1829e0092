"""``kill -9`` during training at a random (seeded) step, then ``--resume``: the final adapter is bitwise identical
to an uninterrupted run's (fp32, one thread). Real processes of ``python -m ltuning train`` on a tiny random BERT."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from tiny_bert import make_tiny_bert, write_data

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_EVERY = 4  # a checkpoint every 4 steps


def _train(args, env, log, kill_after_step=None, delay=0.0):
    """Run ``ltuning train``; with ``kill_after_step``, SIGKILL it ``delay`` s after it reports that validation
    step. Returns (exit status, the validation steps it reported)."""
    with open(log, "ab") as err:
        p = subprocess.Popen([sys.executable, "-m", "ltuning", "train", *args], stdout=subprocess.PIPE, stderr=err,
                             env=env, text=True)
        steps = []
        for line in p.stdout:
            if line.startswith("step "):
                steps.append(int(line.split()[1].rstrip(":")))
                if steps[-1] == kill_after_step:
                    time.sleep(delay)
                    p.send_signal(signal.SIGKILL)
                    break
        p.stdout.close()
        return p.wait(timeout=600), steps


def test_kill_9_then_resume_gives_the_same_adapter_bitwise(tmp_path, seed):
    rng = random.Random(seed)
    model = make_tiny_bert(str(tmp_path / "model"))
    data = write_data(str(tmp_path / "data"), n_train=400, n_dev=20, labels=("a", "b", "c", "d"), seed=seed)
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    # the pairwise objective samples wrong labels from its own generator: its state must survive the kill too
    common = ["--model", model, "--method", "lt-prefix", "--data", data, "--epochs", "1", "--batch-size", "8",
              "--eval-every", str(EVAL_EVERY), "--objective", "pairwise", "--num-negatives", "2", "--seed", "5",
              "--keep-checkpoint"]  # to compare the last step's weights
    log = tmp_path / "stderr.log"
    rc, full_steps = _train([*common, "--out", str(tmp_path / "full")], env, log)
    assert rc == 0, log.read_text()[-3000:]
    total = full_steps[-1]  # 350 training examples / 8 = 44 steps
    # kill at a random validation step (a checkpoint exists before it), after a random delay: inside a step, a
    # validation or the writing of a checkpoint
    kill_at = rng.choice(range(2 * EVAL_EVERY, total // 2, EVAL_EVERY))
    delay = rng.uniform(0.0, 0.05)
    print(f"seed {seed}: kill -9 after step {kill_at} + {delay * 1e3:.0f} ms of {total} steps")
    out = tmp_path / "resumed"
    rc, _ = _train([*common, "--out", str(out)], env, log, kill_after_step=kill_at, delay=delay)
    assert rc == -signal.SIGKILL, f"the run ended (status {rc}) before it was killed"
    assert not (out / "adapter.safetensors").exists()
    assert (out / "checkpoint").is_dir() or (out / "checkpoint.old").is_dir()  # .old: killed between two renames
    rc, steps = _train([*common, "--out", str(out), "--resume"], env, log)
    assert rc == 0, log.read_text()[-3000:]
    assert steps[0] > EVAL_EVERY and steps[-1] == total, steps  # it continued from a checkpoint, not from step 0
    # the final adapter is the best validation step's, which may come before the kill: compare the weights of the
    # last step too (the last checkpoint's) and every validation result
    for name in ("adapter.safetensors", "checkpoint/adapter.safetensors"):
        a, b = load_file(str(tmp_path / "full" / name)), load_file(str(out / name))
        assert a.keys() == b.keys() and len(a) > 0
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, (name, differ)
    ea, eb = (torch.load(d / "checkpoint" / "trainer_state.pt", weights_only=False)["state"]["evals"]
              for d in (tmp_path / "full", out))
    assert ea == eb and len(ea) == total // EVAL_EVERY + (total % EVAL_EVERY > 0)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path / "full", out))
    for k in ("accuracy", "macro_f1", "best_val", "best_step", "steps"):
        assert ma[k] == mb[k], k
