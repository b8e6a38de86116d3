"""The device: its data shard, its part of the model, and the moves between edges.

Per round: take the round's weights from the current edge, then for each step send the
batch's activations, wait for the gradient at the cut, back-propagate and step (mode
classic trains the whole model locally). Between steps, at a boundary, it performs any
move that is due: scheduled in the config for this round, or pending from the control
port. A move closes the source connection, attaches to the destination naming source,
round and step, and continues where the destination says (the same step in mode fedfly,
step 0 in mode restart).
"""

from __future__ import annotations

import logging
import time

import torch

from common import messages as m
from common import transport
from common.config import Config, Move
from common.errors import ConnectionClosed, MigrationError, ProtocolError, RemoteProtocolError, TransportError
from common.events import EventLog
from common.models import build_model, part_keys, split_model
from common.training import LOSS, make_optimizer, round_batches
from device.control import ControlServer, Position

log = logging.getLogger("device")


class EdgeLost(Exception):
    """The device's edge went away outside a move."""


class RunOver(Exception):
    """The edge relayed the central's Shutdown (possibly in the middle of a round)."""


class DeviceClient:
    def __init__(self, cfg: Config, name: str, *, key: bytes, events: EventLog,
                 data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cfg = cfg
        self.name = name
        self.key = key
        self.events = events
        self.x, self.y = data
        self.mode = cfg.mode
        self.me = cfg.devices[name]
        self.pos = Position(edge=self.me.edge)
        self.conn: transport.Connection | None = None
        self.last_round = 0
        self.scheduled = cfg.moves_for(name)
        self.done_moves: set[Move] = set()
        self.migrations: list[dict] = []
        self.compute_s = 0.0   # this round's own compute, and the sleep that stretched it
        self.throttle_s = 0.0
        keys = part_keys(cfg.model["name"], cfg.model["split_layer"])
        self.keys = keys[0] + keys[1] if self.mode == "classic" else keys[0]

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        control = ControlServer(host=self.me.control.listen_host, port=self.me.control_port, key=self.key,
                                device=self.name, edges=list(self.cfg.edges), pos=self.pos, events=self.events).start()
        try:
            self.conn, reply = self._attach(self.pos.edge, m.AttachRequest(
                device=self.name, kind="join", round=0, step=0, source="", last_round=0),
                retry_for=self.cfg.run["startup_timeout"])
            if not reply.ok:
                raise EdgeLost(f"{self.pos.edge} refused {self.name}: {reply.reason}")
            self.events.emit("attached", edge=self.pos.edge)
            while True:
                msg = self._recv()
                if isinstance(msg, m.DeviceRound):
                    self._train_round(msg)
                else:
                    raise RemoteProtocolError(f"device {self.name} (idle): edge sent unexpected {msg.TYPE}")
        except RunOver as exc:
            self.events.emit("shutdown", reason=str(exc))
            return 0
        except (EdgeLost, TransportError, ProtocolError, MigrationError) as exc:
            log.error("%s: %s", self.name, exc)
            self.events.emit("error", detail=str(exc), error=type(exc).__name__)
            return 1
        finally:
            control.close()
            if self.conn is not None:
                self.conn.close()

    def _recv(self, timeout: float | None = None) -> m.Message:
        assert self.conn is not None
        try:
            msg = self.conn.recv(timeout=timeout)
        except ConnectionClosed as exc:
            raise EdgeLost(f"edge {self.pos.edge} closed the connection") from exc
        if isinstance(msg, m.ErrorNotice):
            raise EdgeLost(f"edge {self.pos.edge} reported {msg.kind}: {msg.detail}")
        if isinstance(msg, m.Shutdown):
            raise RunOver(msg.reason)
        return msg

    def _attach(self, edge: str, req: m.AttachRequest, *, retry_for: float = 0.0) -> tuple[transport.Connection, m.AttachReply]:
        ep = self.cfg.edges[edge]
        conn = transport.connect(ep.host, ep.port, key=self.key, peer=f"edge {edge}", retry_for=retry_for)
        conn.send(req)
        try:
            reply = conn.recv(timeout=self.cfg.run["round_timeout"])
        except Exception:
            conn.close()
            raise
        if not isinstance(reply, m.AttachReply):
            conn.close()
            raise RemoteProtocolError(f"edge {edge} answered AttachRequest with {reply.TYPE}")
        if reply.ok and reply.run_name and self.events.path is None:
            import os
            self.events.open(os.path.join(self.cfg.run["out"], reply.run_name))
        return conn, reply

    # -- a round -------------------------------------------------------------------------

    def _train_round(self, msg: m.DeviceRound) -> None:
        r = msg.round
        start_weights = {k: v.clone() for k, v in msg.weights.items()}
        if set(start_weights) != set(self.keys):
            raise RemoteProtocolError(f"device {self.name}: round {r} weights do not fit the model")
        model, opt = self._fresh(start_weights, msg)
        batches = round_batches(len(self.x), msg.batch_size, local_epochs=msg.local_epochs,
                                seed=self.cfg.run["seed"], device=self.name, round=r)
        steps = len(batches)
        with self.pos.lock:
            self.pos.round, self.pos.step, self.pos.steps = r, 0, steps
        self.events.emit("round_start", round=r, steps=steps, edge=self.pos.edge)
        t0 = time.perf_counter()
        step, restarts = 0, 0
        self.compute_s = self.throttle_s = 0.0
        while step < steps:
            resume = self._moves_due(r, step, steps)
            if resume is not None and resume != step:  # mode restart: the round starts over
                model, opt = self._fresh(start_weights, msg)
                step, restarts = resume, restarts + 1
                continue
            idx = batches[step]
            if self.mode == "classic":
                t_step = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                LOSS(model(self.x[idx]), self.y[idx]).backward()
                opt.step()
                compute = time.perf_counter() - t_step
            else:
                compute = self._split_step(model, opt, r, step, self.x[idx], self.y[idx])
            self._throttle(compute)
            step += 1
            with self.pos.lock:
                self.pos.step = step
        train_seconds = time.perf_counter() - t0
        weights = {k: v for k, v in model.state_dict().items()}
        self.conn.send(m.DeviceDone(round=r, samples=len(self.x), steps=steps, train_seconds=train_seconds,
                                    weights=weights))
        self.last_round = r
        self.events.emit("round_done", round=r, steps=steps, train_seconds=train_seconds, restarts=restarts,
                         edge=self.pos.edge, compute_seconds=self.compute_s, throttle_seconds=self.throttle_s)

    def _fresh(self, weights: dict[str, torch.Tensor], msg: m.DeviceRound):
        full = build_model(self.cfg.model["name"], seed=0)
        model = full if self.mode == "classic" else split_model(full, self.cfg.model["split_layer"])[0]
        model.load_state_dict(weights)
        model.train()
        return model, make_optimizer(model.parameters(), lr=msg.lr, momentum=msg.momentum)

    def _split_step(self, model, opt, r: int, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """One lockstep step with the edge; returns the device's own compute seconds (not
        the wait for the edge), which is what ``slowdown`` stretches."""
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        compute = time.perf_counter() - t0
        self.conn.send(m.Activations(round=r, step=step, batch={"x": out.detach(), "y": y}))
        reply = self._recv(timeout=self.cfg.run["round_timeout"])
        if not isinstance(reply, m.Gradients) or (reply.round, reply.step) != (r, step):
            raise RemoteProtocolError(f"device {self.name} (step {step}): expected its Gradients, got {reply.TYPE}")
        grad = reply.grad.get("g")
        if grad is None or grad.shape != out.shape or grad.dtype != out.dtype:
            raise RemoteProtocolError(f"device {self.name}: gradient does not match the activations")
        t1 = time.perf_counter()
        out.backward(grad)
        opt.step()
        return compute + time.perf_counter() - t1

    def _throttle(self, compute_s: float) -> None:
        """Emulate a slower device: stretch each step's compute by ``slowdown``."""
        self.compute_s += compute_s
        if self.me.slowdown > 1:
            pause = compute_s * (self.me.slowdown - 1)
            self.throttle_s += pause
            time.sleep(pause)

    # -- moves ---------------------------------------------------------------------------

    def _moves_due(self, r: int, step: int, steps: int) -> int | None:
        """Perform every move due at this boundary; returns where to resume (None: no move)."""
        resume = None
        while True:
            due = next((mv for mv in self.scheduled if mv.round == r and mv not in self.done_moves
                        and mv.step(steps) <= step), None)
            if due is not None:
                self.done_moves.add(due)
                to = due.to
            else:
                to = self.pos.take_pending()
                if to is None:
                    return resume
            if to == self.pos.edge:
                self.events.emit("move_skipped", to=to, round=r, step=step, reason="already there")
                continue
            resume = self._migrate(to, r, step)
            if resume != step:
                return resume

    def _migrate(self, to: str, r: int, step: int) -> int:
        source = self.pos.edge
        t0 = time.perf_counter()
        self.conn.close()  # leaving the source; it keeps the session until the target pulls it
        req = m.AttachRequest(device=self.name, kind="migrate", round=r, step=step, source=source,
                              last_round=self.last_round)
        try:
            conn, reply = self._attach(to, req)
            failure = "" if reply.ok else reply.reason
        except (TransportError, ProtocolError, TimeoutError) as exc:
            conn, failure = None, str(exc)
        if failure:
            if conn is not None:
                conn.close()
            self.events.emit("move_failed", to=to, round=r, step=step, reason=failure)
            log.warning("%s: move to %s failed (%s); staying on %s", self.name, to, failure, source)
            back = m.AttachRequest(device=self.name, kind="migrate", round=r, step=step, source=source,
                                   last_round=self.last_round)
            self.conn, reply = self._attach(source, back)
            if not reply.ok:
                raise MigrationError(f"move to {to} failed and {source} cannot resume: {reply.reason}")
            return step
        pause_ms = (time.perf_counter() - t0) * 1000
        self.conn = conn
        with self.pos.lock:
            self.pos.edge = to
        report = m.MigrationReport(device=self.name, source=source, target=to, round=r, step=step, mode=self.mode,
                                   pause_ms=pause_ms, state_bytes=reply.state_bytes, transfer_ms=reply.transfer_ms)
        self.conn.send(report)
        self.events.emit("moved", source=source, to=to, round=r, step=step, pause_ms=pause_ms,
                         state_bytes=reply.state_bytes, transfer_ms=reply.transfer_ms, resume_step=reply.resume_step)
        return reply.resume_step
