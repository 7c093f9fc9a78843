#!/usr/bin/env bash
# The test command (README): `bash scripts/test.sh [pytest args]`.
#
# Runs the suite in its own virtual environment (.venv-test/, git-ignored), installed exactly as the README
# says (`pip install -e ".[test]"`), so that the tests see what a new user's machine sees and not whatever
# the system Python happens to have. The environment is reused while its install inputs (pyproject.toml,
# the Python version, the checkout's path) are unchanged, and built afresh otherwise.
# Then Debian's Chromium (browser tests) is installed if missing, and pytest runs from the environment.
# pytest's exit code 5 (no tests collected) is turned into a failure.
#
# Environment: SDLORA_TEST_VENV (folder of the environment, default .venv-test), PYTHON (the Python that
# creates it, default python3), SDLORA_TEST_FRESH=1 (rebuild the environment even if it looks current).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
VENV="${SDLORA_TEST_VENV:-$ROOT/.venv-test}"
PYTHON="${PYTHON:-python3}"

key="$(
    {
        sha256sum pyproject.toml | cut -d' ' -f1
        "$PYTHON" -c 'import sys; print(sys.version)'
        echo "$ROOT"
    } | sha256sum | cut -d' ' -f1
)"
stamp="$VENV/.sdlora-install-key"

if [ "${SDLORA_TEST_FRESH:-0}" = 1 ] || [ ! -x "$VENV/bin/python" ] || [ ! -f "$stamp" ] \
        || [ "$(cat "$stamp")" != "$key" ]; then
    echo "scripts/test.sh: building the test environment in $VENV (pip install -e \".[test]\")" >&2
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q -e ".[test]"
    # Written last: an install that failed half-way is rebuilt on the next run.
    echo "$key" > "$stamp"
else
    echo "scripts/test.sh: reusing the test environment in $VENV" >&2
fi

if [ ! -x /usr/bin/chromium ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    fi
fi

# Tests that start `sdlora` or `python` as a subprocess find the environment's first.
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:$PATH"
unset PYTHONHOME
# Two worker processes (SDLORA_TEST_WORKERS, 0 = none): every test runs torch on one thread (tests/conftest.py),
# so two workers use both cores of a 2-core CI machine. A test file stays on one worker (its module fixtures
# are built once). Arguments that choose workers themselves (-n, -p no:xdist) are left alone.
workers=(-n "${SDLORA_TEST_WORKERS:-2}" --dist loadfile)
for arg in "$@"; do
    case "$arg" in -n|-n*|--numprocesses*|no:xdist) workers=() ;; esac
done
[ "${SDLORA_TEST_WORKERS:-2}" = 0 ] && workers=()
set +e
"$VENV/bin/python" -m pytest "${workers[@]}" "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
    echo "ERROR: pytest collected no tests" >&2
    exit 1
fi
exit "$rc"
