#!/usr/bin/env bash
# Move a device back and forth between two edges N times (A -> B -> A ...), each move
# waiting until it is done. Usage: scripts/scenarios/ping_pong.sh CONFIG DEVICE EDGE_A EDGE_B [N]
source "$(dirname "$0")/common.sh"
cfg=${1:?config}; dev=${2:?device}; a=${3:?edge A}; b=${4:?edge B}; n=${5:-4}
for ((i = 0; i < n; i++)); do
  here=$(status_field "$cfg" "$dev" edge)
  if [[ $here == "$a" ]]; then to=$b; else to=$a; fi
  ctl move --config "$cfg" --device "$dev" --to "$to" --wait
done
