#!/usr/bin/env bash
# Move every device in turn to the next edge (config order, wrapping round), waiting for
# each move to complete before the next. Usage: scripts/scenarios/move_all.sh CONFIG
source "$(dirname "$0")/common.sh"
cfg=${1:?config}
mapfile -t edges < <(config_list "$cfg" edges)
mapfile -t devices < <(config_list "$cfg" device_names)
for dev in "${devices[@]}"; do
  here=$(status_field "$cfg" "$dev" edge)
  next=""
  for i in "${!edges[@]}"; do
    [[ ${edges[$i]} == "$here" ]] && next=${edges[$(( (i + 1) % ${#edges[@]} ))]}
  done
  ctl move --config "$cfg" --device "$dev" --to "$next" --wait
done
