"""The mobility controller: tell a running device to move to another edge, or ask where it is.

    python -m central.mobility move   --config FILE --device NAME --to EDGE [--wait]
                                      [--when-round R --when-fraction F]
    python -m central.mobility drop   --config FILE --device NAME [--for S] [--to EDGE] [--wait]
                                      [--when-round R --when-fraction F]
    python -m central.mobility status --config FILE [--device NAME]

``move``: the device takes the move at its next step boundary (or at the start of the next
round when it is between rounds); ``--wait`` returns once it is on the new edge.
``drop``: the device loses its link at once, at whatever byte (a radio loss: it goes
silent), for S seconds, then reconnects to EDGE, or where ``faults.reconnect`` says;
``--wait`` returns once it is attached again. ``status``: each device's edge, round,
step and link (connecting, attached, reconnecting, cut), or "gone" when it cannot be reached.
Exit status: 0 done, 3 the device refused (the reason is printed), 2 a bad argument or
config, 1 the device could not be reached or did not move in time, 4 the run ended first
(the device, once reached, and the central are both gone: a run over does not keep a
``--wait`` or ``--when-*`` waiting for its timeout).
"""

from __future__ import annotations

import argparse
import socket
import sys
import time

from common import messages as m
from common import transport
from common.config import Config, load_config
from common.errors import ConfigError, ProtocolError, TransportError
from common.security import CONTROLLER, Credentials, Identity
from common.text import printable

# Exit statuses beside 0 (done), 1 (failed) and 2 (a bad command line or config), so a
# scenario script can tell a refused move and a run that is over from a failure.
REFUSED = 3
RUN_ENDED = 4


class RunEnded(TransportError):
    """The run is over: the device we talked to and the central are both gone."""


def central_listening(cfg: Config) -> bool:
    """Whether something accepts TCP connections on the central's port (a bare connect,
    closed at once: the central's own log counts it as a refused handshake)."""
    try:
        socket.create_connection((cfg.central.host, cfg.central.port), timeout=2.0).close()
        return True
    except OSError:
        return False


def _connect(cfg: Config, device: str, creds: Credentials) -> transport.Connection:
    ep = cfg.devices[device].control
    return transport.connect(ep.host, ep.port, creds=creds, expect=Identity("device", device), peer=f"device {device}",
                             timeout=10.0)


def move(cfg: Config, device: str, to: str, *, creds: Credentials) -> m.MoveReply:
    """Send one move command; returns the device's reply."""
    conn = _connect(cfg, device, creds)
    try:
        conn.send(m.MoveCommand(device=device, to=to))
        reply = conn.recv(timeout=10.0)
    finally:
        conn.close()
    if not isinstance(reply, m.MoveReply):
        raise ProtocolError(f"device {device} answered a move with {reply.TYPE}")
    return reply


def drop(cfg: Config, device: str, seconds: float, to: str, *, creds: Credentials) -> m.MoveReply:
    """Cut ``device``'s link for ``seconds``; returns the device's reply."""
    conn = _connect(cfg, device, creds)
    try:
        conn.send(m.DropCommand(device=device, seconds=seconds, to=to))
        reply = conn.recv(timeout=10.0)
    finally:
        conn.close()
    if not isinstance(reply, m.MoveReply):
        raise ProtocolError(f"device {device} answered a drop with {reply.TYPE}")
    return reply


def wait_until_attached(cfg: Config, device: str, *, creds: Credentials, timeout: float, after: float = 0.0) -> m.StatusReply:
    """Poll until ``device``'s link is attached again (checking from ``after`` seconds on)."""
    time.sleep(after)
    deadline = time.monotonic() + timeout
    while True:
        st = _poll(cfg, device, creds=creds, deadline=deadline)
        if st is not None and st.link == "attached":
            return st
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{device} is not attached after {timeout} s")
        time.sleep(0.05)


def status(cfg: Config, device: str, *, creds: Credentials) -> m.StatusReply:
    conn = _connect(cfg, device, creds)
    try:
        conn.send(m.StatusRequest())
        reply = conn.recv(timeout=10.0)
    finally:
        conn.close()
    if not isinstance(reply, m.StatusReply):
        raise ProtocolError(f"device {device} answered a status request with {reply.TYPE}")
    return reply


_reached: set[str] = set()  # devices this controller has had an answer from


def _poll(cfg: Config, device: str, *, creds: Credentials, deadline: float) -> m.StatusReply | None:
    """One status poll; None while the device cannot be reached yet (not up, or between
    two of its lives), until ``deadline``, then the error. Raises ``RunEnded`` when a
    device that answered before is gone and so is the central (a device restarted by
    the launcher comes back while the central stays up; at the run's end both leave)."""
    try:
        st = status(cfg, device, creds=creds)
    except (TransportError, ProtocolError, TimeoutError) as exc:
        if device in _reached and not central_listening(cfg):
            raise RunEnded(f"the run has ended: {device} and the central are gone") from exc
        if time.monotonic() >= deadline:
            raise
        return None
    _reached.add(device)
    return st


def wait_until_at(cfg: Config, device: str, round: int, fraction: float, *, creds: Credentials,
                  timeout: float) -> m.StatusReply:
    """Poll until ``device`` is in ``round`` at step >= fraction x steps (or past it)."""
    deadline = time.monotonic() + timeout
    while True:
        st = _poll(cfg, device, creds=creds, deadline=deadline)
        if st is not None and (st.round > round or (st.round == round and st.steps > 0
                                                     and st.step >= fraction * st.steps)):
            return st
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{device} did not reach round {round} at {fraction} within {timeout} s")
        time.sleep(0.01)


def wait_until_on(cfg: Config, device: str, edge: str, *, creds: Credentials, timeout: float) -> m.StatusReply:
    deadline = time.monotonic() + timeout
    while True:
        st = _poll(cfg, device, creds=creds, deadline=deadline)
        if st is not None and st.edge == edge and not st.pending and st.link == "attached":
            return st
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{device} is not on {edge} after {timeout} s")
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fedfly-mobility", description="FedFly mobility controller")
    sub = p.add_subparsers(dest="cmd", required=True)
    pm = sub.add_parser("move", help="move a device to another edge")
    pd = sub.add_parser("drop", help="cut a device's link for a while (a radio loss)")
    ps = sub.add_parser("status", help="where devices are")
    for q in (pm, pd, ps):
        q.add_argument("--config", required=True)
        q.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    for q in (pm, pd):
        q.add_argument("--device", required=True)
        q.add_argument("--timeout", type=float, default=600.0, help="seconds to wait with --wait or --when-*")
        q.add_argument("--when-round", type=int, default=None, help="act once the device is in this round...")
        q.add_argument("--when-fraction", type=float, default=0.0, help="...at this fraction of its steps (0 <= F < 1)")
    pm.add_argument("--to", required=True, help="destination edge")
    pm.add_argument("--wait", action="store_true", help="return once the device is on the new edge")
    pd.add_argument("--for", dest="seconds", type=float, default=0.0, help="seconds without a link (default 0)")
    pd.add_argument("--to", default="", help="the edge it comes back to (default: as faults.reconnect says)")
    pd.add_argument("--wait", action="store_true", help="return once the device is attached again")
    ps.add_argument("--device", default=None, help="one device (default: all)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        devices = [args.device] if args.device else cfg.device_names
        for d in devices:
            if d not in cfg.devices:
                raise ConfigError("--device", f"{d!r} is not a device of {args.config}",
                                  f"use one of: {', '.join(cfg.device_names)}")
        if args.cmd in ("move", "drop") and args.to and args.to not in cfg.edges:
            raise ConfigError("--to", f"{args.to!r} is not an edge of {args.config}",
                              f"use one of: {', '.join(sorted(cfg.edges))}")
        if args.cmd == "drop" and args.seconds < 0:
            raise ConfigError("--for", f"{args.seconds} is negative", "give the seconds without a link, >= 0")
        creds = cfg.credentials(CONTROLLER)
    except ConfigError as exc:
        print(f"fedfly-mobility: error: {exc}", file=sys.stderr)
        return 2
    try:
        if args.cmd == "status":
            for d in devices:
                try:
                    st = status(cfg, d, creds=creds)
                except (TransportError, ProtocolError, TimeoutError) as exc:
                    print(f"{d} link=gone ({printable(exc)})")
                    continue
                print(f"{printable(st.device)} edge={printable(st.edge)} round={st.round} step={st.step} "
                      f"steps={st.steps} pending={printable(st.pending or '-')} link={printable(st.link)}")
            return 0
        if args.when_round is not None:
            wait_until_at(cfg, args.device, args.when_round, args.when_fraction, creds=creds, timeout=args.timeout)
        if args.cmd == "drop":
            reply = drop(cfg, args.device, args.seconds, args.to, creds=creds)
            _reached.add(args.device)
            if not reply.accepted:
                print(f"fedfly-mobility: refused: {printable(reply.reason)}", file=sys.stderr)
                return REFUSED
            print(f"{args.device}: link to {printable(reply.edge)} cut for {args.seconds:g} s", flush=True)
            if args.wait:
                st = wait_until_attached(cfg, args.device, creds=creds, timeout=args.timeout, after=args.seconds)
                print(f"{args.device}: attached again on {printable(st.edge)} (round {st.round}, step {st.step})")
            return 0
        reply = move(cfg, args.device, args.to, creds=creds)
        _reached.add(args.device)
        if not reply.accepted:
            print(f"fedfly-mobility: refused: {printable(reply.reason)}", file=sys.stderr)
            return REFUSED
        print(f"{args.device}: move {printable(reply.edge)} -> {args.to} accepted", flush=True)
        if args.wait:
            st = wait_until_on(cfg, args.device, args.to, creds=creds, timeout=args.timeout)
            print(f"{args.device}: now on {printable(st.edge)} (round {st.round}, step {st.step})")
        return 0
    except RunEnded as exc:
        print(f"fedfly-mobility: {printable(exc)}; nothing more to wait for", file=sys.stderr)
        return RUN_ENDED
    except (TransportError, ProtocolError, TimeoutError) as exc:
        if not central_listening(cfg):
            print(f"fedfly-mobility: the run has ended or not started (no central on {cfg.central.host}:"
                  f"{cfg.central.port}): {printable(exc)}", file=sys.stderr)
            return RUN_ENDED
        print(f"fedfly-mobility: error: {printable(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
