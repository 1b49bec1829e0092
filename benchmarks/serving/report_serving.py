"""Tables + chart of the serving benchmarks: reads the JSON of ``bench_classify.py`` and ``bench_serve.py``, writes
``results/serving.md`` (embedded in RESULTS_serving.md, kept in sync by ``sync_results``) and
``results/serving_classify.png``.

Reads both record versions of ``bench_classify.py``: version 2 (the probe of the model's own per-token Linears,
see that script's docstring) in full; version 1 (a single GEMM probe, ``matrix_gflops``) with that rate marked
"GEMM" and its one-pass ceiling and "of ceiling" dropped (that probe gave ceilings below the measured speed).
"x HF pipeline" only against the pipeline row of the same model, dataset and dtype. Accuracy: one row per adapter
(fp32 / int8 / bf16 and the deltas), from either version.

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


HF = "hf-pipeline-lora-merged"


def hf_rate(rows: list, r: dict):
    """ex/s of the HF pipeline row of ``r``'s model, dataset and dtype in ``rows`` (None if there is none: a row
    is compared with the pipeline only in the same dtype; int8 has no pipeline row, so no ratio)."""
    for h in rows:
        if h["system"] == HF and (h["model"], h["dataset"], h["dtype"]) == (r["model"], r["dataset"], r["dtype"]):
            return h["examples_per_s"]
    return None


def classify_table(rec) -> list:
    """One row per timed system. Record version 2 (bench_classify's module docstring): the probe of the model's
    own per-token Linears before / after the row, its m and module count, the one-pass ceiling and utilisation.
    Version-1 rows (``matrix_gflops``: a single (512, d) x (d, 4d) GEMM before the row, known to swing and to
    give ceilings below the measured speed) show that rate marked "GEMM" and no ceiling or utilisation."""
    out = [("| model | data | system | dtype | examples | ex/s | tokens/s | peak RSS MB | probe GFLOP/s before / "
            "after | m | Linears | one-pass ceiling ex/s | of ceiling | x HF pipeline (same dtype) |"),
           "|" + "---|" * 14]
    for r in rec["rows"]:
        hf = hf_rate(rec["rows"], r)
        if "probe_gflops" in r:
            probe = f"{_f(r['probe_gflops_before'])} / {_f(r['probe_gflops_after'])}"
            m, mods = str(r["probe_m"]), str(r["probe_modules"])
            ceiling, util = _f(r["one_pass_ceiling_ex_s"]), _f(100 * r["utilisation"], 0) + " %"
        else:
            probe = f"GEMM {_f(r['matrix_gflops'])}" if r.get("matrix_gflops") is not None else ""
            m = mods = ceiling = util = ""
        out.append(f"| {r['model']} | {r['dataset']} | {r['system']} | {r['dtype']} | {r['examples']} | "
                   f"{_f(r['examples_per_s'])} | {_f(r.get('tokens_per_s'), 0)} | {_f(r['peak_rss_mb'], 0)} | "
                   f"{probe} | {m} | {mods} | {ceiling} | {util} | "
                   f"{_f(r['examples_per_s'] / hf, 2) if hf else ''} |")
    return out


def accuracy_table(rows: list) -> list:
    """One row per (adapter, dataset): accuracy in fp32 / int8 / bf16 and the deltas to fp32 in points. Rows of
    version-1 records carry no dataset (they were SST-2 only: shown as sst2) and no method / scoring (blank)."""
    out = ["| adapter | data | method | scoring | examples | fp32 | int8 | bf16 | int8 - fp32 | bf16 - fp32 |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["adapter"], r.get("dataset", "sst2")), []).append(r)
    for (adapter, ds), rs in groups.items():
        acc = {r["dtype"]: 100 * r["accuracy"] for r in rs}
        n = sorted({r["examples"] for r in rs})
        first = rs[0]
        delta = {d: f"{acc[d] - acc['fp32']:+.1f}" if d in acc and "fp32" in acc else "" for d in ("int8", "bf16")}
        out.append(f"| `{os.path.basename(os.path.normpath(adapter))}` | {ds} | {first.get('method') or ''} | "
                   f"{first.get('scoring') or ''} | {', '.join(map(str, n))} | "
                   + " | ".join(f"{acc[d]:.1f} %" if d in acc else "" for d in ("fp32", "int8", "bf16"))
                   + f" | {delta['int8']} | {delta['bf16']} |")
    return out


def load_note(rec: dict) -> str:
    """What the record says about other load on the machine: the 1-minute load average at its start and end (older
    records carry a hand-written ``note`` instead)."""
    if "load_average_start" not in rec:
        return rec.get("note", "load not recorded")
    end = rec.get("load_average_end")
    return "1-min load average %.2f at start, %s at end (%d cores)" % (
        rec["load_average_start"][0], "%.2f" % end[0] if end else "not recorded", rec["machine"].get("cores", 0))


def single_forward_note(s: dict) -> str:
    """The single-request forward(s) behind the 1-client p99 target, as the record gives them."""
    if "single_request_forward_p99_ms" in s:
        ones = [r for r in s["levels"] if r["clients"] == 1 and "within_own_target" in r]
        own = (f"; {100 * ones[0]['within_own_target']:.1f} % of the {ones[0]['judged_against_own_target']} "
               f"1-client requests judged were within 1.5 x their own input's forward + max-wait") if ones else ""
        return (f"single-request forward over the {s['single_request_inputs']} inputs the 1-client level sends "
                f"first, one call each: median {s['single_request_forward_ms']:.1f} ms, p99 "
                f"{s['single_request_forward_p99_ms']:.1f} ms, so the 1-client p99 target is "
                f"{s['p99_target_ms_1_client']:.1f} ms{own}")
    return (f"single-request forward {s['single_request_forward_ms']:.1f} ms, so the 1-client p99 target is "
            f"{s['p99_target_ms_1_client']:.1f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--classify", required=True, action="append", help="JSON of bench_classify (repeatable)")
    ap.add_argument("--serve", default=None)
    ap.add_argument("--accuracy", default=[], action="append",
                    help="JSON of a bench_classify --accuracy-adapter run (v1 or v2; repeatable)")
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
    acc_rows = []
    for path in a.accuracy:
        acc = json.load(open(path))
        if not acc.get("accuracy"):
            continue
        acc_rows += acc["accuracy"]
        lines += ["", f"Accuracy of trained adapters on the dev set of each adapter's dataset, by inference dtype "
                      f"(deltas in points; `{acc['command']}`; commit {acc['commit']}, {acc['date']}; "
                      f"{load_note(acc)}; JSON `{os.path.relpath(path, BENCH)}`):", ""]
        lines += accuracy_table(acc["accuracy"])
    if a.serve:
        s = json.load(open(a.serve))
        lines += ["", f"Server (`{s['command']}`; commit {s['commit']}, {s['date']}; {s['model']} {s['method']} "
                      f"{s['dtype']}, {s['threads']} thread(s), `--max-wait-ms {s['max_wait_ms']}`"
                      + (f", `--max-idle-ms {s['max_idle_ms']}`" if "max_idle_ms" in s else "")
                      + f"; loopback; {load_note(s)}; "
                      f"JSON `{os.path.relpath(a.serve, BENCH)}`). Offline classify in the same run: "
                      f"{s['offline_examples_per_s']:.1f} ex/s; " + single_forward_note(s) + "; server exit code "
                      f"after SIGTERM: {s['server_exit_code']}.", "",
                  "| clients | answered | errors | ex/s | p50 ms | p99 ms | of offline | engine batches | mean batch "
                  "| offline in batches of `clients` ex/s | of that | engine busy |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        chunked = s.get("offline_chunked_examples_per_s", {})
        for r in s["levels"]:
            ch = chunked.get(str(r["clients"]))
            lines.append(f"| {r['clients']} | {r['answered']} | {r['errors']} | {_f(r['examples_per_s'])} | "
                         f"{_f(r['p50_ms'])} | {_f(r['p99_ms'])} | {_f(100 * r['fraction_of_offline'], 0)} % | "
                         f"{_f(r.get('engine_batches'), 0)} | {_f(r.get('mean_batch_examples'))} | {_f(ch)} | "
                         f"{_f(100 * r['fraction_of_offline_chunked'], 0) + ' %' if 'fraction_of_offline_chunked' in r else ''} | "
                         f"{_f(100 * r['engine_busy_fraction'], 0) + ' %' if 'engine_busy_fraction' in r else ''} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(os.path.splitext(a.out)[0] + ".json", "w") as f:  # the record of this report's figures
        json.dump({"sources": a.classify + [a.serve] + a.accuracy, "rows": allrows,
                   "serve": json.load(open(a.serve)) if a.serve else None, "accuracy": acc_rows}, f,
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
