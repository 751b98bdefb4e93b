#!/usr/bin/env bash
# One-command set-up for lmmfast on a fresh Debian/Ubuntu machine.
#
#   bash tools/setup.sh example   # install, then fit an example model and print its summary
#   bash tools/setup.sh test      # install with test extras, then run the test suite
#
# Installs the system packages lmmfast builds against when they are missing
# (SuiteSparse/CHOLMOD headers, OpenBLAS, a C compiler, Python headers and venv; nlopt's C
# headers when they can be had: optional), creates a virtual environment in .venv and
# installs lmmfast into it with pip (meson-python build).
# Extra arguments after `test` go to pytest (e.g. `bash tools/setup.sh test -m slow`).
set -euo pipefail

action="${1:-example}"
shift || true
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "setup: need root (or sudo) to run: $*" >&2; exit 1; fi
}

# ---- system packages, only those missing
missing=()
have_pkg() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if command -v dpkg-query >/dev/null; then
    for p in libsuitesparse-dev libopenblas-dev pkg-config; do have_pkg "$p" || missing+=("$p"); done
    command -v cc >/dev/null || missing+=(build-essential)
    command -v "$PY" >/dev/null || missing+=(python3)
    if command -v "$PY" >/dev/null; then
        "$PY" -c "import venv, ensurepip" 2>/dev/null || missing+=(python3-venv)
        "$PY" -c "import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()['include'], 'Python.h')))" \
            || missing+=(python3-dev)
    fi
    if [ ${#missing[@]} -gt 0 ]; then
        echo "setup: installing system packages: ${missing[*]}"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q
        as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
    fi
    # optional: nlopt's C headers let BOBYQA's loop run in C (lmmfast builds without them)
    if ! have_pkg libnlopt-dev && { [ "$(id -u)" = 0 ] || command -v sudo >/dev/null; }; then
        echo "setup: installing libnlopt-dev (optional)"
        { [ ${#missing[@]} -gt 0 ] || as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q; } \
            && as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q libnlopt-dev \
            || echo "setup: libnlopt-dev not installed; building without the compiled BOBYQA loop" >&2
    fi
else
    echo "setup: not a Debian-like system; make sure SuiteSparse (CHOLMOD) headers and a C compiler are installed" >&2
fi

# ---- virtual environment and the package
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
VPY="$root/.venv/bin/python"
"$VPY" -m pip install -q --upgrade pip
case "$action" in
    example)
        "$VPY" -m pip install -q .
        # from an empty directory: the installed package, not the source tree, and no
        # stray module of the working directory (a shared /tmp holds anything) shadowing one
        cd "$(mktemp -d)" && exec "$VPY" -m lmmfast
        ;;
    test)
        "$VPY" -m pip install -q ".[test]"
        # run from the repository root; pytest (not `python -m pytest`) keeps the source tree
        # off sys.path, so the installed, compiled package is the one tested
        exec "$root/.venv/bin/pytest" -p no:cacheprovider "$@"
        ;;
    *)
        echo "usage: bash tools/setup.sh [example|test] [pytest args...]" >&2
        exit 2
        ;;
esac
