"""The historical command of the accuracy runner: ``python benchmarks/accuracy.py --quick`` (or any of its options)
runs ``benchmarks/accuracy/run.py`` with the same arguments. See that file."""
import os
import runpy
import sys

if __name__ == "__main__":
    sys.argv[0] = os.path.join(os.path.dirname(os.path.abspath(__file__)), "accuracy", "run.py")
    runpy.run_path(sys.argv[0], run_name="__main__")
