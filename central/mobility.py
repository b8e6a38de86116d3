"""The mobility controller: tell a running device to move to another edge, or ask where it is.

    python -m central.mobility move   --config FILE --device NAME --to EDGE [--wait]
                                      [--when-round R --when-fraction F]
    python -m central.mobility status --config FILE [--device NAME]

The device takes the move at its next step boundary (or at the start of the next round
when it is between rounds); ``--wait`` returns once it is on the new edge. Exit status:
0 done, 3 the device refused (the reason is printed), 2 a bad argument or config, 1 the
device could not be reached or did not move in time.
"""

from __future__ import annotations

import argparse
import sys
import time

from common import messages as m
from common import transport
from common.config import Config, load_config
from common.errors import ConfigError, ProtocolError, TransportError

REFUSED = 3


def _connect(cfg: Config, device: str, key: bytes) -> transport.Connection:
    ep = cfg.devices[device].control
    return transport.connect(ep.host, ep.port, key=key, peer=f"device {device}", timeout=10.0)


def move(cfg: Config, device: str, to: str, *, key: bytes) -> m.MoveReply:
    """Send one move command; returns the device's reply."""
    conn = _connect(cfg, device, key)
    try:
        conn.send(m.MoveCommand(device=device, to=to))
        reply = conn.recv(timeout=10.0)
    finally:
        conn.close()
    if not isinstance(reply, m.MoveReply):
        raise ProtocolError(f"device {device} answered a move with {reply.TYPE}")
    return reply


def status(cfg: Config, device: str, *, key: bytes) -> m.StatusReply:
    conn = _connect(cfg, device, key)
    try:
        conn.send(m.StatusRequest())
        reply = conn.recv(timeout=10.0)
    finally:
        conn.close()
    if not isinstance(reply, m.StatusReply):
        raise ProtocolError(f"device {device} answered a status request with {reply.TYPE}")
    return reply


def wait_until_at(cfg: Config, device: str, round: int, fraction: float, *, key: bytes,
                  timeout: float) -> m.StatusReply:
    """Poll until ``device`` is in ``round`` at step >= fraction x steps (or past it)."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(cfg, device, key=key)
        if st.round > round or (st.round == round and st.steps > 0 and st.step >= fraction * st.steps):
            return st
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{device} did not reach round {round} at {fraction} within {timeout} s")
        time.sleep(0.01)


def wait_until_on(cfg: Config, device: str, edge: str, *, key: bytes, timeout: float) -> m.StatusReply:
    deadline = time.monotonic() + timeout
    while True:
        st = status(cfg, device, key=key)
        if st.edge == edge and not st.pending:
            return st
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{device} is still on {st.edge} after {timeout} s (pending: {st.pending or 'none'})")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfly-mobility", description="FedFly mobility controller")
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("move", help="move a device to another edge")
    ps = sub.add_parser("status", help="where devices are")
    for q in (pm, ps):
        q.add_argument("--config", required=True)
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    pm.add_argument("--device", required=True)
    pm.add_argument("--to", required=True, help="destination edge")
    pm.add_argument("--wait", action="store_true", help="return once the device is on the new edge")
    pm.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait or --when-*")
    pm.add_argument("--when-round", type=int, default=None, help="send the move once the device is in this round...")
    pm.add_argument("--when-fraction", type=float, default=0.0, help="...at this fraction of its steps (0 <= F < 1)")
    ps.add_argument("--device", default=None, help="one device (default: all)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        devices = [args.device] if args.device else cfg.device_names
        for d in devices:
            if d not in cfg.devices:
                raise ConfigError("--device", f"{d!r} is not a device of {args.config}",
                                  f"use one of: {', '.join(cfg.device_names)}")
        key = cfg.key()
    except ConfigError as exc:
        print(f"fedfly-mobility: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "status":
            for d in devices:
                st = status(cfg, d, key=key)
                print(f"{st.device} edge={st.edge} round={st.round} step={st.step} steps={st.steps} "
                      f"pending={st.pending or '-'}")
            return 0
        if args.when_round is not None:
            wait_until_at(cfg, args.device, args.when_round, args.when_fraction, key=key, timeout=args.timeout)
        reply = move(cfg, args.device, args.to, key=key)
        if not reply.accepted:
            print(f"fedfly-mobility: refused: {reply.reason}", file=sys.stderr)
            return REFUSED
        print(f"{args.device}: move {reply.edge} -> {args.to} accepted", flush=True)
        if args.wait:
            st = wait_until_on(cfg, args.device, args.to, key=key, timeout=args.timeout)
            print(f"{args.device}: now on {st.edge} (round {st.round}, step {st.step})")
        return 0
    except (TransportError, ProtocolError, TimeoutError) as exc:
        print(f"fedfly-mobility: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
