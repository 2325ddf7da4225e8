#!/usr/bin/env bash
# Create the project environment if it is missing, reuse it if present, then run a command in it.
#   scripts/env.sh bmj reproduce --profile demo
#   scripts/env.sh test
# The environment lives in $BMJ_VENV (default: .venv in the repository root). It is rebuilt only when
# pyproject.toml changes (its sha256 is stamped into the venv).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BMJ_VENV:-$root/.venv}"
python="${BMJ_PYTHON:-python3}"
stamp="$venv/.bmj-pyproject.sha256"
want="$(sha256sum "$root/pyproject.toml" | cut -d' ' -f1)"

ready() { [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; }
if ! ready; then
  # One creator at a time: a second command started meanwhile waits for the first one's environment.
  mkdir -p "$(dirname "$venv")"
  exec 9>"$venv.lock"
  flock 9
fi
if ! ready; then
  echo "[env] creating environment in $venv (first run: several minutes, torch is large)" >&2
  "$python" -m venv "$venv"
  log="$venv/install.log"
  # pip's own output goes to a log (this machine's pip config is chatty); it is shown if pip fails.
  if ! { "$venv/bin/python" -m pip install --upgrade pip && "$venv/bin/python" -m pip install -e "$root[test]"; } >"$log" 2>&1; then
    tail -n 40 "$log" >&2; echo "[env] pip install failed; full log: $log" >&2; exit 1
  fi
  echo "$want" > "$stamp"
  echo "[env] environment ready" >&2
else
  # Same dependencies: only (re)point the editable install at this checkout, without touching deps.
  if ! "$venv/bin/python" -c "import bmjlib, os, sys; sys.exit(os.path.dirname(os.path.dirname(bmjlib.__file__)) != sys.argv[1])" "$root" 2>/dev/null; then
    "$venv/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$root" >/dev/null 2>&1
  fi
fi

export PATH="$venv/bin:$PATH"
export MPLBACKEND="${MPLBACKEND:-Agg}"
cd "$root"
if [ "${1:-}" = "test" ]; then
  shift
  # Chromium for the explorer's browser test comes from Debian's packages; skip quietly if apt is unusable.
  if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) || echo "[env] chromium not installed; browser test will be skipped" >&2
  fi
  # tests/ plus every notebook under nbval (lax), which runs the chain on the smoke profile; one pytest-xdist
  # worker per core (tests/conftest.py keeps the notebooks, the tests sharing one smoke chain, and each test file on
  # one worker); the slowest 30 tests are listed at the end (CI has 20 minutes).
  exec python -m pytest -n auto --nbval-lax -p no:cacheprovider --durations=30 tests notebooks "$@"
fi
exec "$@"
