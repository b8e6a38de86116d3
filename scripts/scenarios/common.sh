# Shared by the scenario scripts: the Python to run, the controller, and reading a
# device's status.
# Usage: source "$(dirname "$0")/common.sh"
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# The Python with the project's packages: $PYTHON if set, else the project's .venv (made by
# `make venv`, `make demo` or `make test`), else python3 from PATH (an activated
# environment). The system's python3 usually lacks torch: say what to do, rather than
# fail later with ModuleNotFoundError.
if [[ -n ${PYTHON:-} ]]; then
  PY=$PYTHON
elif [[ -x $ROOT/.venv/bin/python ]]; then
  PY=$ROOT/.venv/bin/python
else
  PY=python3
fi
if ! "$PY" -c 'import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in ("torch", "msgpack", "cryptography")))' 2>/dev/null; then
  echo "$(basename "$0"): $PY cannot import the project's packages (torch, msgpack, cryptography)." >&2
  echo "  Run \`make venv\` in $ROOT (it makes .venv, which these scripts then use)," >&2
  echo "  or set PYTHON to a Python that has them: PYTHON=/path/to/python $0 ..." >&2
  exit 1
fi

# The controller; when it fails (exit 4: the run ended first), the script stops with its
# status and says so.
ctl() {
  local rc=0
  "$PY" -m central.mobility "$@" || rc=$?
  if ((rc != 0)); then
    echo "$(basename "$0"): stopped: the controller exited with status $rc" >&2
    exit "$rc"
  fi
}

# status_field CONFIG DEVICE FIELD -> the value of FIELD (edge, round, step, steps, pending, link)
status_field() {
  ctl status --config "$1" --device "$2" | tr ' ' '\n' | sed -n "s/^$3=//p"
}

# config_list CONFIG edges|device_names -> one name a line
config_list() {
  "$PY" -c "import sys; from common.config import load_config; print('\n'.join(getattr(load_config(sys.argv[1]), sys.argv[2])))" "$1" "$2"
}
