"""The edge server: one split-training session per attached device, lockstep with it.

Threads: one reads the central's messages (round starts, shutdown); one per accepted
connection serves a device (attach, steps, end of round) or a peer edge (a migration
pulling a session from us). ``sessions`` and ``links`` are shared under ``lock``; a
session's own lock serialises its training against a snapshot.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass

import torch

from common import messages as m
from common import transport
from common.config import Config
from common.errors import ConnectionClosed, MigrationError, ProtocolError, RemoteProtocolError, TransportError
from common.events import EventLog
from common.models import part_keys, select
from edge.migration import PeerLinks, drop_remote, pull_session, serve_drop, serve_pull
from edge.session import EdgeSession, SparePart

log = logging.getLogger("edge")

# A connection must say what it is (attach, pull, drop) this soon after the handshake.
FIRST_MESSAGE_TIMEOUT_S = 30.0


@dataclass
class RoundInfo:
    round: int
    lr: float
    momentum: float
    batch_size: int
    local_epochs: int
    weights: dict[str, torch.Tensor]


@dataclass
class DeviceLink:
    conn: transport.Connection
    last_round: int  # the last round whose update this device has finished


class EdgeServer:
    def __init__(self, cfg: Config, name: str, *, key: bytes, events: EventLog) -> None:
        self.cfg = cfg
        self.name = name
        self.key = key
        self.events = events
        self.mode = cfg.mode
        self.model_name = cfg.model["name"]
        self.split = cfg.model["split_layer"]
        self.device_keys, self.edge_keys = part_keys(self.model_name, self.split)
        self.lock = threading.Condition()
        self.status_lock = threading.Lock()
        self.sessions: dict[str, EdgeSession] = {}
        self.links: dict[str, DeviceLink] = {}
        self.current: RoundInfo | None = None
        self.run_name: str | None = None
        self.welcomed = threading.Event()
        self.central: transport.Connection | None = None
        self.listener: transport.Listener | None = None
        self.spare = SparePart(self.model_name, self.split + 1) if self.mode == "fedfly" else None
        self.peers = PeerLinks(key=key, endpoints={n: (e.host, e.port) for n, e in cfg.edges.items() if n != name})

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        """Serve until the central says stop (0) or is lost (1)."""
        me = self.cfg.edges[self.name]
        self.listener = transport.Listener(me.listen_host, me.port, key=self.key, handler=self._serve,
                                           on_reject=self._rejected, name=self.name).start()
        self.events.emit("listening", host=me.listen_host, port=me.port)
        c = self.cfg.central
        try:
            self.central = transport.connect(c.host, c.port, key=self.key, peer="central",
                                             retry_for=self.cfg.run["startup_timeout"])
            self.central.send(m.EdgeHello(edge=self.name))
            welcome = self.central.recv(timeout=self.cfg.run["startup_timeout"])
            if not isinstance(welcome, m.Welcome):
                raise RemoteProtocolError(f"central answered EdgeHello with {welcome.TYPE}")
        except (TransportError, ProtocolError, TimeoutError) as exc:
            log.error("%s: cannot join the central: %s", self.name, exc)
            self.events.emit("error", detail=f"cannot join central: {exc}")
            self.listener.close()
            return 1
        self.run_name = welcome.run_name
        self.events.open(os.path.join(self.cfg.run["out"], welcome.run_name))
        self.events.emit("joined", run=welcome.run_name, mode=welcome.mode)
        self.welcomed.set()
        self._report_status()
        status, reason = 0, "run finished"
        try:
            while True:
                msg = self.central.recv()
                if isinstance(msg, m.RoundStart):
                    self._on_round_start(msg)
                elif isinstance(msg, m.Shutdown):
                    reason = msg.reason
                    break
                else:
                    raise RemoteProtocolError(f"edge {self.name} (joined): central sent unexpected {msg.TYPE}")
        except (TransportError, ProtocolError) as exc:
            log.error("%s: lost the central: %s", self.name, exc)
            self.events.emit("error", detail=f"lost central: {exc}")
            status, reason = 1, "central lost"
        self._shutdown(reason)
        return status

    def _shutdown(self, reason: str) -> None:
        self.events.emit("shutdown", reason=reason)
        with self.lock:
            links = list(self.links.values())
        for link in links:
            link.conn.close(notice=m.Shutdown(reason=reason))
        if self.listener:
            self.listener.close()
        self.peers.close()
        if self.central:
            self.central.close()

    def _rejected(self, peer: str, exc: Exception) -> None:
        log.warning("%s: refused %s: %s", self.name, peer, exc)
        self.events.emit("refused", peer=peer, detail=str(exc))

    def _report_status(self) -> None:
        # Read and send under one lock: two attaches racing must not let a stale list
        # overtake a newer one on the wire (the central keeps the last list it gets).
        with self.status_lock:
            with self.lock:
                attached = sorted(self.links)
            if self.central is not None and self.welcomed.is_set():
                try:
                    self.central.send(m.EdgeStatus(edge=self.name, attached=attached))
                except TransportError:
                    pass  # the central reader thread reports the loss

    # -- rounds --------------------------------------------------------------------------

    def _on_round_start(self, msg: m.RoundStart) -> None:
        info = RoundInfo(msg.round, msg.lr, msg.momentum, msg.batch_size, msg.local_epochs, msg.weights)
        with self.lock:
            self.current = info
            # Sessions of earlier rounds are orphans of failed handovers: nobody can use them.
            for dev in [d for d, s in self.sessions.items() if s.round < info.round]:
                self.events.emit("orphan_dropped", device=dev, round=self.sessions[dev].round)
                del self.sessions[dev]
            starting = [(d, link) for d, link in self.links.items() if link.last_round < info.round]
            self.lock.notify_all()
        self.events.emit("round_start", round=info.round, devices=[d for d, _ in starting])
        for dev, link in starting:
            self._start_device_round(dev, link, info)

    def _start_device_round(self, device: str, link: DeviceLink, info: RoundInfo) -> None:
        session = self._fresh_session(device, info)
        with self.lock:
            self.sessions[device] = session
        weights = info.weights if self.mode == "classic" else select(info.weights, self.device_keys)
        try:
            link.conn.send(m.DeviceRound(round=info.round, lr=info.lr, momentum=info.momentum,
                                         batch_size=info.batch_size, local_epochs=info.local_epochs, weights=weights))
        except TransportError as exc:
            self.events.emit("error", device=device, detail=f"cannot start round: {exc}")

    def _fresh_session(self, device: str, info: RoundInfo) -> EdgeSession:
        edge_state = None if self.mode == "classic" else select(info.weights, self.edge_keys)
        return EdgeSession(device=device, round=info.round, mode=self.mode, model=self.model_name,
                           split_layer=self.split, lr=info.lr, momentum=info.momentum,
                           part_state=edge_state, seed=self.cfg.run["seed"])

    def _wait_round(self, round: int) -> RoundInfo:
        with self.lock:
            ok = self.lock.wait_for(lambda: self.current is not None and self.current.round >= round,
                                    timeout=self.cfg.run["round_timeout"])
            if not ok or self.current is None or self.current.round != round:
                raise MigrationError(f"edge {self.name} has no weights for round {round}")
            return self.current

    # -- connections ---------------------------------------------------------------------

    def _serve(self, conn: transport.Connection) -> None:
        try:
            first = conn.recv(timeout=FIRST_MESSAGE_TIMEOUT_S)
            if isinstance(first, m.AttachRequest):
                conn.peer = f"device {first.device}"
                self._serve_device(conn, first)
            elif isinstance(first, (m.SessionPull, m.SessionDrop)):
                conn.peer = f"edge {first.target}"
                self._serve_peer(conn, first)
            else:
                raise RemoteProtocolError(f"edge {self.name} (new connection): {first.TYPE} is not allowed first")
        except ConnectionClosed:
            pass
        except (RemoteProtocolError, MigrationError, TimeoutError) as exc:
            log.warning("%s: closing %s: %s", self.name, conn.peer, exc)
            self.events.emit("protocol_error", peer=conn.peer, detail=str(exc), error=type(exc).__name__)
            conn.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)))
        except TransportError as exc:
            self.events.emit("connection_error", peer=conn.peer, detail=str(exc))

    def _serve_peer(self, conn: transport.Connection, msg: m.Message) -> None:
        """A peer edge's kept link: one handover after another, until it closes."""
        while True:
            if isinstance(msg, m.SessionPull):
                done = serve_pull(conn, msg, lookup=self._session_of, drop=self._drop_session,
                                  unfreeze=self._unfreeze)
                self.events.emit("handed_over" if done else "handover_refused", device=msg.device,
                                 round=msg.round, step=msg.step, to=msg.target)
            elif isinstance(msg, m.SessionDrop):
                serve_drop(conn, msg, drop_device=self._drop_device)
                self.events.emit("session_dropped", device=msg.device, round=msg.round, to=msg.target)
            else:
                raise RemoteProtocolError(f"edge {self.name} (peer link): {msg.TYPE} is not allowed")
            msg = conn.recv()

    def _session_of(self, device: str) -> EdgeSession | None:
        with self.lock:
            return self.sessions.get(device)

    def _drop_session(self, session: EdgeSession) -> None:
        with self.lock:
            if self.sessions.get(session.device) is session:
                del self.sessions[session.device]

    def _drop_device(self, device: str) -> None:
        with self.lock:
            self.sessions.pop(device, None)

    @staticmethod
    def _unfreeze(session: EdgeSession) -> None:
        with session.lock:
            session.frozen = False

    def _attach_reply(self, conn: transport.Connection, *, ok: bool, reason: str = "", resume_step: int = 0,
                      state_bytes: int = 0, transfer_ms: float = 0.0) -> None:
        conn.send(m.AttachReply(ok=ok, reason=reason, run_name=self.run_name or "", mode=self.mode,
                                resume_step=resume_step, state_bytes=state_bytes, transfer_ms=transfer_ms))

    def _serve_device(self, conn: transport.Connection, req: m.AttachRequest) -> None:
        if not self.welcomed.wait(self.cfg.run["startup_timeout"]):
            self._attach_reply(conn, ok=False, reason=f"edge {self.name} has not joined the central yet")
            return
        if req.device not in self.cfg.devices:
            self._attach_reply(conn, ok=False, reason=f"{req.device!r} is not a device of this testbed")
            return
        if req.kind == "migrate":
            try:
                resume, state_bytes, transfer_ms = self._migrate_in(req)
            except MigrationError as exc:
                self.events.emit("migration_failed", device=req.device, source=req.source, detail=str(exc))
                self._attach_reply(conn, ok=False, reason=str(exc))
                return
            link = DeviceLink(conn, last_round=req.round - 1)
            self._attach_reply(conn, ok=True, resume_step=resume, state_bytes=state_bytes, transfer_ms=transfer_ms)
            if self.spare is not None:
                self.spare.refill_soon()  # after the reply: the device is not kept waiting
        else:
            link = DeviceLink(conn, last_round=req.last_round)
            self._attach_reply(conn, ok=True)
        with self.lock:
            old = self.links.get(req.device)
            self.links[req.device] = link
            info = self.current
            start_now = req.kind == "join" and info is not None and info.round > req.last_round \
                and req.device not in self.sessions
        if old is not None:
            old.conn.close(notice=m.Shutdown(reason="replaced by a newer connection of the same device"))
        self.events.emit("attached", device=req.device, kind=req.kind, source=req.source, round=req.round, step=req.step)
        self._report_status()
        if start_now:
            self._start_device_round(req.device, link, info)
        try:
            self._device_loop(conn, req.device, link)
        finally:
            with self.lock:
                if self.links.get(req.device) is link:
                    del self.links[req.device]
                session = self.sessions.get(req.device)
            self.events.emit("detached", device=req.device)
            if session is not None and self.mode == "fedfly":
                # The device left between steps: most likely it is moving. Hash its session
                # now, while it reconnects, so the pull only has to send it.
                session.prepare_snapshot()
            self._report_status()

    def _migrate_in(self, req: m.AttachRequest) -> tuple[int, int, float]:
        """Take over ``req.device``'s session; returns (resume step, bytes moved, ms)."""
        if req.source == self.name:  # coming back after a failed move elsewhere: resume here
            session = self._session_of(req.device)
            if session is None or (session.round, session.step) != (req.round, req.step):
                raise MigrationError(f"no session of {req.device} at round {req.round} step {req.step} here")
            return req.step, 0, 0.0
        if req.source not in self.cfg.edges:
            raise MigrationError(f"source {req.source!r} is not an edge of this testbed")
        if self.mode == "fedfly" and req.step > 0:
            def install(session: EdgeSession) -> None:
                with self.lock:
                    self.sessions[req.device] = session
            try:
                result = pull_session(self.peers, source=req.source, target=self.name, device=req.device,
                                      round=req.round, step=req.step, model=self.model_name,
                                      split_layer=self.split, install=install, spare=self.spare)
            except MigrationError:
                self._drop_device(req.device)
                raise
            self.events.emit("migrated_in", device=req.device, source=req.source, round=req.round, step=req.step,
                             state_bytes=result.state_bytes, transfer_ms=result.transfer_ms)
            return req.step, result.state_bytes, result.transfer_ms
        # restart: the session starts over from the round's weights; classic: bookkeeping
        # only; fedfly at step 0 (a move that waited for the round to start): nothing has
        # been trained yet, so the round's weights are the whole session.
        info = self._wait_round(req.round)
        transfer_ms = drop_remote(self.peers, source=req.source, target=self.name, device=req.device,
                                  round=req.round)
        session = self._fresh_session(req.device, info)
        resume = 0 if self.mode == "restart" else req.step
        session.step = resume
        with self.lock:
            self.sessions[req.device] = session
        self.events.emit("migrated_in", device=req.device, source=req.source, round=req.round, step=req.step,
                         resume_step=resume, state_bytes=0, transfer_ms=transfer_ms)
        return resume, 0, transfer_ms

    def _device_loop(self, conn: transport.Connection, device: str, link: DeviceLink) -> None:
        while True:
            try:
                msg = conn.recv()
            except ConnectionClosed:
                return
            if isinstance(msg, m.Activations):
                session = self._session_of(device)
                if session is None or session.round != msg.round or self.mode == "classic":
                    raise RemoteProtocolError(f"edge {self.name}: Activations for {device} round {msg.round} "
                                              "but no split session of that round is here")

                def reply(grad: torch.Tensor, loss: float, _r=msg.round, _s=msg.step) -> None:
                    conn.send(m.Gradients(round=_r, step=_s, loss=loss, grad={"g": grad}))
                try:
                    session.train_step(msg.step, msg.batch["x"], msg.batch["y"], reply)
                except MigrationError as exc:
                    raise RemoteProtocolError(str(exc)) from None
                except RuntimeError as exc:  # shapes that do not fit the edge part
                    raise RemoteProtocolError(f"edge part cannot take this batch: {exc}") from None
            elif isinstance(msg, m.DeviceDone):
                self._finish_round(device, link, msg)
            elif isinstance(msg, m.MigrationReport):
                self._to_central(msg)
            else:
                raise RemoteProtocolError(f"edge {self.name} (serving {device}): {msg.TYPE} is not allowed")

    def _finish_round(self, device: str, link: DeviceLink, msg: m.DeviceDone) -> None:
        session = self._session_of(device)
        if session is None or session.round != msg.round:
            raise RemoteProtocolError(f"edge {self.name}: DeviceDone for {device} round {msg.round} without its session")
        expected = set(self.device_keys) | set(self.edge_keys) if self.mode == "classic" else set(self.device_keys)
        if set(msg.weights) != expected:
            raise RemoteProtocolError(f"edge {self.name}: DeviceDone from {device} has the wrong weights")
        with session.lock:
            weights = {**msg.weights, **session.weights()}
        self._drop_session(session)
        link.last_round = msg.round
        self._to_central(m.DeviceUpdate(round=msg.round, device=device, edge=self.name, samples=msg.samples,
                                        steps=msg.steps, train_seconds=msg.train_seconds, weights=weights))
        self.events.emit("device_done", device=device, round=msg.round, samples=msg.samples, steps=msg.steps,
                         train_seconds=msg.train_seconds, edge_steps=session.step)

    def _to_central(self, msg: m.Message) -> None:
        if self.central is None:
            return
        try:
            self.central.send(msg)
        except TransportError as exc:
            self.events.emit("error", detail=f"cannot reach central: {exc}")
