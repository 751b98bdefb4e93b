"""lmmfast builds with meson-python (see pyproject.toml); there is one build system.

Install with ``pip install .`` (or ``pip install -e . --no-build-isolation`` while developing).
This shim only exists so that ``python setup.py`` tells you so instead of failing obscurely.
"""
import sys

if __name__ == "__main__":
    sys.exit("lmmfast is built with meson-python: run `pip install .` "
             "(see README.md for the one-command setup).")
