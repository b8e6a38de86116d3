#!/usr/bin/env bash
# A device loses its radio in the middle of a round and turns up again: its link is cut
# (it goes silent, at whatever byte) half-way through ROUND for SECONDS, then it
# reconnects to EDGE (default: where faults.reconnect says), and this script waits until
# it is attached again and prints its status.
# Usage: scripts/scenarios/drop_reappear.sh CONFIG DEVICE SECONDS [EDGE] [ROUND]
source "$(dirname "$0")/common.sh"
cfg=${1:?config}; dev=${2:?device}; secs=${3:?seconds}; to=${4:-}; round=${5:-1}
args=(drop --config "$cfg" --device "$dev" --for "$secs" --when-round "$round" --when-fraction 0.5 --wait)
[[ -n $to ]] && args+=(--to "$to")
ctl "${args[@]}"
ctl status --config "$cfg" --device "$dev"
