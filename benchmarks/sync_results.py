"""Keep the tables in ``benchmarks/RESULTS*.md`` equal to the reports the benchmark scripts write.

A RESULTS file embeds a report (a markdown file under ``results/``) between two markers:

    <!-- report: results/accuracy.md -->
    ...the report's text, rewritten from the file, never edited by hand...
    <!-- /report -->

``accuracy.py`` and ``multitask.py`` call :func:`sync` on the report they just wrote, so regenerating a table
updates the documentation with it; a test runs :func:`stale` so a hand-edited or forgotten copy fails CI.

    python benchmarks/sync_results.py           # rewrite every embedded report from its file
    python benchmarks/sync_results.py --check   # exit 1 and name the stale blocks and the figures without a record
                                                # (benchmarks/check_figures.py)
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
BLOCK = re.compile(r"(<!-- report: (?P<src>\S+) -->\n)(?P<body>.*?)(<!-- /report -->)", re.S)


def _docs(folder: str) -> list:
    return sorted(glob.glob(os.path.join(folder, "RESULTS*.md")))


def _render(doc: str, only: str | None) -> tuple[str, list]:
    """The text of ``doc`` with its report blocks rewritten (only the one whose source is ``only``, if given),
    and the sources that changed."""
    folder = os.path.dirname(doc)
    with open(doc, encoding="utf-8") as f:
        text = f.read()
    changed = []

    def fill(m: re.Match) -> str:
        src = os.path.normpath(os.path.join(folder, m["src"]))
        if only is not None and src != os.path.normpath(os.path.abspath(only)):
            return m[0]
        if not os.path.isfile(src):
            raise FileNotFoundError(f"{doc}: the report block names {m['src']}, which does not exist")
        with open(src, encoding="utf-8") as f:
            body = f.read().strip("\n") + "\n"
        if body != m["body"]:
            changed.append(m["src"])
        return m[1] + body + m[4]

    return BLOCK.sub(fill, text), changed


def stale(folder: str = HERE) -> list:
    """``(RESULTS file, report)`` pairs whose embedded copy differs from the report's file."""
    return [(os.path.basename(d), s) for d in _docs(folder) for s in _render(d, None)[1]]


def sync(only: str | None = None, folder: str = HERE) -> list:
    """Rewrite the embedded reports (only those of the file ``only``, if given), atomically; returns
    ``(RESULTS file, report)`` pairs that changed."""
    done = []
    for doc in _docs(folder):
        text, changed = _render(doc, only)
        if changed:
            tmp = doc + ".tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, doc)
            done += [(os.path.basename(doc), s) for s in changed]
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="change nothing; exit 1 if a block is stale")
    a = ap.parse_args(argv)
    pairs = stale() if a.check else sync()
    for doc, src in pairs:
        print(f"{doc}: {src} {'is stale' if a.check else 'updated'}")
    problems = []
    if a.check:
        sys.path.insert(0, HERE)
        from check_figures import check
        problems = check()
        print("\n".join(problems + [f"{len(problems)} figure(s) without a record"]) if problems else
              "every figure has a record")
    return 1 if (a.check and (pairs or problems)) else 0


if __name__ == "__main__":
    sys.exit(main())
