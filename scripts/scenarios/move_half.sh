#!/usr/bin/env bash
# Move one device to another edge half-way through a round of a running testbed, and
# wait until it is there. Usage: scripts/scenarios/move_half.sh CONFIG DEVICE TO_EDGE [ROUND]
source "$(dirname "$0")/common.sh"
cfg=${1:?config}; dev=${2:?device}; to=${3:?destination edge}; round=${4:-1}
ctl move --config "$cfg" --device "$dev" --to "$to" --when-round "$round" --when-fraction 0.5 --wait
