"""Tables + chart of the serving benchmarks: reads the JSON of ``bench_classify.py`` and ``bench_serve.py``, writes
``results/serving.md`` (embedded in RESULTS_serving.md, kept in sync by ``sync_results``) and
``results/serving_classify.png``.

    python benchmarks/serving/report_serving.py --classify benchmarks/results/serving_classify.json \
        --serve benchmarks/results/serving_server.json --accuracy benchmarks/results/serving_int8_accuracy.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # paths in the report are relative to it


def _f(x, nd=1):
    return "" if x is None else f"{x:.{nd}f}"


def classify_table(rec) -> list:
    out = ["| model | data | system | dtype | examples | ex/s | tokens/s | peak RSS MB | matrix GFLOP/s | "
           "one-pass ceiling ex/s | of ceiling | x HF pipeline |", "|" + "---|" * 12]
    # the HF pipeline runs in fp32 only: a row is compared with it in the same dtype (int8 = fp32 activations)
    base = {(r["model"], r["dataset"], r["dtype"]): r["examples_per_s"] for r in rec["rows"]
            if r["system"] == "hf-pipeline-lora-merged"}
    for r in rec["rows"]:
        hf = base.get((r["model"], r["dataset"], r["dtype"]))
        out.append(f"| {r['model']} | {r['dataset']} | {r['system']} | {r['dtype']} | {r['examples']} | "
                   f"{_f(r['examples_per_s'])} | {_f(r.get('tokens_per_s'), 0)} | {_f(r['peak_rss_mb'], 0)} | "
                   f"{_f(r['matrix_gflops'])} | {_f(r.get('one_pass_ceiling_ex_s'))} | "
                   f"{_f(100 * r['utilisation'], 0) + ' %' if 'utilisation' in r else ''} | "
                   f"{_f(r['examples_per_s'] / hf, 2) if hf else ''} |")
    return out


def load_note(rec: dict) -> str:
    """What the record says about other load on the machine: the 1-minute load average at its start and end (older
    records carry a hand-written ``note`` instead)."""
    if "load_average_start" not in rec:
        return rec.get("note", "load not recorded")
    end = rec.get("load_average_end")
    return "1-min load average %.2f at start, %s at end (%d cores)" % (
        rec["load_average_start"][0], "%.2f" % end[0] if end else "not recorded", rec["machine"].get("cores", 0))


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--classify", required=True, action="append", help="JSON of bench_classify (repeatable)")
    ap.add_argument("--serve", default=None)
    ap.add_argument("--accuracy", default=None, help="JSON of a bench_classify --accuracy-adapter run")
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "serving.md"))
    a = ap.parse_args(argv)
    lines, allrows = [], []
    for path in a.classify:
        c = json.load(open(path))
        m = c["machine"]
        lines += [f"Offline (`{c['command']}`; commit {c['commit']}, {c['date']}; {m['cpu']}, "
                  f"amx_bf16={m['amx_bf16']}, "
                  f"avx512_bf16={m['avx512_bf16']}, avx512_vnni={m['avx512_vnni']}, {m['torch_threads']} thread(s); "
                  f"{load_note(c)}; JSON `{os.path.relpath(path, BENCH)}`):", ""]
        lines += classify_table(c) + [""]
        allrows += c["rows"]
    lines.pop()
    c = {"rows": allrows}
    streams = [r for r in c["rows"] if "stream_loss" in r]
    for r in streams:
        lines += ["", f"Streamed `classify_file` vs in-memory ({r['model']}, {r['dataset']}, {r['examples']} "
                      f"examples, medians of alternated runs): {r['stream_seconds_median']:.2f} s vs "
                      f"{r['in_memory_seconds_median']:.2f} s, a loss of {100 * r['stream_loss']:.1f} %."]
    acc = json.load(open(a.accuracy)) if a.accuracy else {}
    if acc.get("accuracy"):
        lines += ["", f"Accuracy of one quick trained adapter on SST-2 dev, by inference dtype (`{acc['command']}`; "
                      f"commit {acc['commit']}, {acc['date']}; JSON `{os.path.relpath(a.accuracy, BENCH)}`):",
                  "",
                  "| adapter | dtype | examples | accuracy | ex/s |", "|---|---|---|---|---|"]
        for r in acc["accuracy"]:
            lines.append(f"| `{os.path.basename(r['adapter'])}` | {r['dtype']} | {r['examples']} | "
                         f"{100 * r['accuracy']:.1f} % | {_f(r['examples_per_s'])} |")
    if a.serve:
        s = json.load(open(a.serve))
        lines += ["", f"Server (`{s['command']}`; commit {s['commit']}, {s['date']}; {s['model']} {s['method']} "
                      f"{s['dtype']}, {s['threads']} thread(s), `--max-wait-ms {s['max_wait_ms']}`; loopback; {load_note(s)}; "
                      f"JSON `{os.path.relpath(a.serve, BENCH)}`). Offline classify in the same run: "
                      f"{s['offline_examples_per_s']:.1f} ex/s; single-request forward "
                      f"{s['single_request_forward_ms']:.1f}"
                      f" ms, so the 1-client p99 target is {s['p99_target_ms_1_client']:.1f} ms; server exit code "
                      f"after SIGTERM: {s['server_exit_code']}.", "",
                  "| clients | answered | errors | ex/s | p50 ms | p99 ms | of offline |",
                  "|---|---|---|---|---|---|---|"]
        for r in s["levels"]:
            lines.append(f"| {r['clients']} | {r['answered']} | {r['errors']} | {_f(r['examples_per_s'])} | "
                         f"{_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {_f(100 * r['fraction_of_offline'], 0)} % |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:  # the record of this report's figures
        json.dump({"sources": a.classify + [a.serve, a.accuracy], "rows": allrows,
                   "serve": json.load(open(a.serve)) if a.serve else None, "accuracy": acc.get("accuracy")}, f,
                  indent=1)
    with open(a.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        groups = sorted({(r["model"], r["dataset"]) for r in c["rows"]})
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, g in zip(axes[0], groups):
            rows = [r for r in c["rows"] if (r["model"], r["dataset"]) == g]
            ax.barh([f"{r['system']} {r['dtype']}" for r in rows], [r["examples_per_s"] for r in rows])
            ax.set_title(f"{g[0]} {g[1]}")
            ax.set_xlabel("examples/s")
        fig.tight_layout()
        fig.savefig(os.path.join(os.path.dirname(a.out), "serving_classify.png"), dpi=90)
    except ImportError:
        pass
    sys.path.insert(0, BENCH)
    from sync_results import sync
    sync(only=a.out)


if __name__ == "__main__":
    main()
