"""Every published figure has a record: find each measured number of the docs in a JSON under ``results/``.

Scanned: ``README.md``, ``benchmarks/RESULTS*.md`` and the module docstrings of ``ltuning/``. A *figure* is
(markup-free heuristic, no annotations needed):

* a number with a measurement unit: ``85.2 %``, ``1.22x``, ``3733 ms``, ``7.6 s``, ``2.73 h``, ``12 min``,
  ``2311 MB``, ``1.5 GB``, ``134 GFLOP/s``, ``103 ex/s``; a range ``72-87 %`` is two figures;
* a ``mean ± std`` pair (each number is a figure, the unit of the pair if any);
* a markdown table cell that is a bare number (``| 2.87 |``, ``| 5.97x |``, ``| 2,532 MB |``).

Code (fenced blocks and inline backticks) is skipped: commands hold options (``--lr 1e-3``), not results.
Numbers without a unit in prose (``30 layers``, ``r=8``, ``500 training examples``, ``lr 1e-3``, ``issue 18``,
``135M``) are not figures, so they need no allowlist; the few unit-bearing numbers that are not measurements are
allowed by :data:`ALLOW` below, each class with its reason.

A figure is *recorded* when a number of a JSON named in the same section (the text between two markdown headings;
a JSON is named by a path ending in ``results/NAME.json``) shows it with the rounding shown: ``85.2`` matches
0.8523 or 85.23, ``1.22x`` matches 1.2214, ``3733 ms`` matches 3.733 (s) or 3733. A ratio (``5.97x``) is also
recorded when it is the quotient of two recorded figures shown on the same line (a table row's two times).
A section with figures must name its JSON: that is the "command printed next to it" rule. Module docstrings are one
section each. A report block (``<!-- report: results/X.md -->``, see ``sync_results.py``) is the output of the
script that wrote ``results/X.json`` from that JSON (a test keeps the copy equal to the file): its figures are not
re-checked, the section counts as naming ``results/X.json``, and prose may quote the block's figures; a link to
``results/X.md`` (next to ``results/X.json``) counts the same way.

Limits: presence, not correspondence. In a large JSON (the accuracy table holds thousands of scores) a wrong
1-decimal percentage can be found by coincidence; ``±`` pairs need both numbers, which makes that rarer.

    python benchmarks/check_figures.py          # exit 1 and list every figure without a record
"""
from __future__ import annotations

import argparse
import ast
import bisect
import glob
import json
import math
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

NUM = r"[-−]?\d[\d,]*(?:\.\d+)?"
# unit -> factors f: the figure v is recorded by a JSON number p when p * f shows as v
UNITS = {
    "%": (1, 100),
    "x": (1,),
    "ms": (1, 1000),
    "s": (1, 1e-3),
    "min": (1, 1 / 60),
    "h": (1, 1 / 3600),
    "MB": (1, 1e-6, 2 ** -20, 1000),
    "GB": (1, 1e-9, 2 ** -30, 1e-3),
    "GFLOP/s": (1, 1000, 1e-9),
    "ex/s": (1,),
    "": (1, 100, 1000, 1e-9),  # a bare table cell: a fraction as %, seconds as ms, FLOPs / bytes as GFLOP / GB
}
UNIT_RE = r"(?P<unit>%|x(?![\w])|×(?![\w])|ms\b|s\b|min\b|h\b|MB\b|GB\b|GFLOP/s|ex/s)"
WITH_UNIT = re.compile(rf"(?<![\w.\-/=])(?P<a>{NUM})(?:\s?[-–]\s?(?P<b>{NUM}))?\s?{UNIT_RE}")
PLUS_MINUS = re.compile(rf"(?<![\w.])(?P<a>{NUM})\s*(?:±|\+-)\s*(?P<b>{NUM})(?:\s?(?P<unit>%|x\b))?")
CELL = re.compile(rf"^\**(?P<a>{NUM})(?:\s?(?P<unit>%|x|ms|s|MB|GB))?\**$")
JSON_REF = re.compile(r"results/[\w.\-]+\.json")
MD_REF = re.compile(r"results/[\w.\-]+\.md")
REPORT = re.compile(r"<!-- report: (?P<src>\S+) -->\n(?P<body>.*?)<!-- /report -->", re.S)
ANY_NUM = re.compile(rf"(?<![\w.])(?P<a>{NUM})")

# Unit-bearing numbers that are not measurements, by class (regexes over the figure's line, matched at the figure).
ALLOW = [
    # targets quoted from an issue ("target >= 5x"): a goal, not a result
    (r"(?:target|stretch)[^.;)]*?>=\s*{fig}", "a target set by an issue"),
    # the configuration of a run or test, in time units ("--stop-after 75" minutes is code; prose "after 75 minutes")
    (r"budget of {fig}|under ~?{fig}|< ?{fig}", "a budget or bound, not a result"),
]


def figures(text: str):
    """``(line_no, shown, value, decimals, unit, line_figures)`` of each figure in markdown ``text`` (code skipped);
    ``line_figures`` are the ``(value, decimals)`` of every figure on the same line (for ratios)."""
    out = []
    in_code = False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        if in_code:
            continue
        line = re.sub(r"`[^`]*`", " ", line)
        line = re.sub(r"\]\([^)]*\)", "]", line)  # link targets
        line = re.sub(r"<!--.*?-->", " ", line)
        found = {}  # start offset of the number -> (shown, number, unit)
        for m in PLUS_MINUS.finditer(line):
            unit = m["unit"] or "%"  # a bare ± pair: a score shown as a percent or as itself
            for g in ("a", "b"):
                found[m.start(g)] = (m[0], m[g], unit)
        for m in WITH_UNIT.finditer(line):
            if m["unit"] in ("x", "×") and line[m.end("b" if m["b"] else "a"):m.start("unit")].strip() == "" \
                    and m.start("unit") > m.end("b" if m["b"] else "a"):
                continue  # "16 x 16" is a shape, "1.22x" a ratio
            if _allowed(line, m):
                continue
            unit = "x" if m["unit"] == "×" else m["unit"]
            for g in ("a", "b"):
                if m[g] and m.start(g) not in found:
                    found[m.start(g)] = (m[0], m[g], unit)
        if line.strip().startswith("|") and not re.match(r"^\|[\s|:\-]+\|?$", line.strip()):
            pos = 0
            for cell in line.split("|"):
                c = cell.strip()
                m = CELL.match(c)
                if m and not (m["unit"] == "x" and _value(m["a"]) == 1):  # 1.00x: a ratio column's baseline
                    start = pos + cell.index(c) + m.start("a")
                    if start not in found:
                        found[start] = (c, m["a"], m["unit"] or "")
                pos += len(cell) + 1
        on_line = [(_value(v), _decimals(v)) for _, v, _ in found.values()]
        out += [(i, shown, _value(v), _decimals(v), unit, on_line) for _, (shown, v, unit) in sorted(found.items())]
    return out


def quotient_on_line(value: float, decimals: int, on_line: list) -> bool:
    """True if a ratio ``value`` is the quotient of two other figures shown on its line (each within its rounding):
    "| 2.87 | 17.14 | 5.97x |" derives 5.97x from the two times beside it."""
    tol = 0.5 * 10 ** -decimals * (1 + 1e-9)
    for a, da in on_line:
        for b, db in on_line:
            if (a, da) == (value, decimals) or (b, db) == (value, decimals) or b == 0 or a == b:
                continue
            ta, tb = 0.5 * 10 ** -da, 0.5 * 10 ** -db
            if b - tb <= 0:
                continue
            lo, hi = (a - ta) / (b + tb), (a + ta) / (b - tb)
            if lo - tol <= value <= hi + tol:
                return True
    return False


def _allowed(line: str, m: re.Match) -> bool:
    if m["unit"] in ("x", "×") and not m["b"] and _value(m["a"]) == 1:
        return True  # "1.00x": the baseline of a ratio column, by definition
    fig = re.escape(m[0])
    return any(re.search(pat.format(fig=fig), line) for pat, _ in ALLOW)


def _value(s: str) -> float:
    return float(s.replace(",", "").replace("−", "-"))


def _decimals(s: str) -> int:
    return len(s.split(".")[1]) if "." in s else 0


def sections(text: str):
    """``(first_line, body)`` of each markdown section (split at headings outside code)."""
    out, start, cur, in_code = [], 1, [], False
    for i, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"^#{1,6} ", line) and cur:
            out.append((start, "\n".join(cur)))
            start, cur = i, []
        cur.append(line)
    out.append((start, "\n".join(cur)))
    return out


def json_numbers(path: str) -> list:
    """Every number in a JSON file (bools excluded), sorted."""
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    nums = []

    def walk(x):
        if isinstance(x, bool) or x is None:
            return
        if isinstance(x, (int, float)):
            if math.isfinite(x):
                nums.append(float(x))
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    walk(data)
    return sorted(nums)


def recorded(value: float, decimals: int, unit: str, pools: list) -> bool:
    """True if some number p of the pools shows as ``value`` with ``decimals`` after scaling by a factor of
    ``unit``."""
    tol = 0.5 * 10 ** -decimals * (1 + 1e-9) + 1e-12
    for f in UNITS.get(unit, (1,)):
        lo, hi = sorted(((value - tol) / f, (value + tol) / f))
        for pool in pools:
            k = bisect.bisect_left(pool, lo)
            if k < len(pool) and pool[k] <= hi:
                return True
    return False


def docs(root: str = ROOT) -> list:
    """``(name, text)`` of every scanned document: README, RESULTS*.md, module docstrings of ltuning/."""
    out = []
    for path in [os.path.join(root, "README.md")] + sorted(glob.glob(os.path.join(root, "benchmarks", "RESULTS*.md"))):
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                out.append((os.path.relpath(path, root), f.read()))
    for path in sorted(glob.glob(os.path.join(root, "ltuning", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            doc = ast.get_docstring(ast.parse(f.read()))
        if doc:
            out.append((os.path.relpath(path, root) + " (module docstring)", doc))
    return out


def check(root: str = ROOT) -> list:
    """Problems, one line each: ``file:line: figure ... (reason)``. Empty when every figure has a record."""
    results = os.path.join(root, "benchmarks", "results")
    cache = {}
    problems = []

    def pool(path):
        if path not in cache:
            cache[path] = json_numbers(path)
        return cache[path]

    for name, text in docs(root):
        for first, body in sections(text):
            refs, report_nums = set(JSON_REF.findall(body)), []

            def embedded(m):  # a report the script wrote from results/X.json: its JSON is this section's record
                rec = os.path.splitext(os.path.basename(m["src"]))[0] + ".json"
                if not os.path.isfile(os.path.join(results, rec)):
                    return m[0]  # not a JSON's report: its figures are checked like any others
                refs.add("results/" + rec)
                report_nums.extend(_value(x["a"]) for x in ANY_NUM.finditer(m["body"]))
                return "\n" * m[0].count("\n")  # keep the line numbers

            body = REPORT.sub(embedded, body)
            for md in set(MD_REF.findall(body)):  # a linked report of results/X.json counts like an embedded one
                stem = os.path.join(results, os.path.splitext(os.path.basename(md))[0])
                if os.path.isfile(stem + ".json") and os.path.isfile(stem + ".md"):
                    refs.add("results/" + os.path.basename(stem) + ".json")
                    with open(stem + ".md", encoding="utf-8") as f:
                        report_nums.extend(_value(x["a"]) for x in ANY_NUM.finditer(f.read()))
            figs = figures(body)
            if not figs:
                continue
            refs = sorted(refs)
            pools = [sorted(report_nums)] if report_nums else []
            for ref in refs:
                path = os.path.join(results, os.path.basename(ref))
                if os.path.isfile(path):
                    pools.append(pool(path))
                else:
                    problems.append(f"{name}:{first}: the section names {ref}, which does not exist")
            for line, shown, value, dec, unit, on_line in figs:
                where = f"{name}:{first + line - 1}"
                if not refs:
                    problems.append(f"{where}: figure {shown!r} in a section that names no results/*.json record")
                elif not recorded(value, dec, unit, pools) and not (
                        unit == "x" and quotient_on_line(value, dec, [f for f in on_line if recorded(*f, "", pools)])):
                    problems.append(f"{where}: figure {shown!r} ({value:g}) is in none of {', '.join(refs)}")
    return problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=ROOT, help="repository root (default: this checkout)")
    a = ap.parse_args(argv)
    problems = check(a.root)
    for p in problems:
        print(p)
    print(f"{len(problems)} figure(s) without a record" if problems else "every figure has a record")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
