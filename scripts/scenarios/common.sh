# Shared by the scenario scripts: the controller, and reading a device's status.
# Usage: source "$(dirname "$0")/common.sh"
set -euo pipefail
PY=${PYTHON:-python3}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

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
