"""The device: its data shard, its part of the model, and the training loop.

Per round: the round's work comes from the edge (``EdgeLink.wait_round``); then, for each
step, "maybe move; step": a move source may send the device to another edge at this
boundary, then the batch's activations go out and the gradient at the cut comes back
(mode classic trains the whole model locally). Everything about links, drops and
reattaching is ``device.link.EdgeLink``'s; what reaches this loop is where to go on from
(``Rollback``) or that the round is over for this device (``RoundOver``).
"""

from __future__ import annotations

import logging
import time

import torch

from common import messages as m
from common.config import Config
from common.errors import ProtocolError, RemoteProtocolError, TestbedError, TransportError
from common.events import EventLog
from common.models import build_model, part_keys, split_model
from common.plan import RoundPlan
from common.training import LOSS, make_optimizer, round_batches
from device.control import ControlServer, Position
from device.link import EdgeLink, EdgeUnreachable, Rollback, RoundOver, RunOver
from device.moves import CommandedMoves, MoveSources, ScheduledDrops, ScheduledMoves

log = logging.getLogger("device")


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
        self.link = EdgeLink(cfg=cfg, name=name, key=key, events=events, pos=self.pos)
        self.moves = MoveSources(ScheduledMoves(cfg.moves_for(name)), CommandedMoves(self.pos))
        self.drops = ScheduledDrops(cfg.drops_for(name))
        self.compute_s = 0.0   # this round's own compute, and the sleep that stretched it
        self.throttle_s = 0.0
        keys = part_keys(cfg.model["name"], cfg.model["split_layer"])
        self.keys = keys[0] + keys[1] if self.mode == "classic" else keys[0]

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        control = ControlServer(host=self.me.control.listen_host, port=self.me.control_port, key=self.key,
                                device=self.name, edges=list(self.cfg.edges), pos=self.pos, events=self.events,
                                cut=self.link.cut, handshake_timeout=self.cfg.faults["dead_after_s"]).start()
        try:
            self.link.join()
            work: m.DeviceRound | None = None
            while True:
                if work is None:
                    self.link.at(self.link.last_round, 0, 0, in_round=False)
                    work = self.link.wait_round()
                work = self._train_round(work)
        except RunOver as exc:
            self.events.emit("shutdown", reason=str(exc))
            return 0
        except (EdgeUnreachable, TransportError, ProtocolError) as exc:
            log.error("%s: %s", self.name, exc)
            self.events.emit("error", detail=str(exc)[:300], error=type(exc).__name__)
            return 1
        finally:
            control.close()
            self.link.close()

    # -- a round -------------------------------------------------------------------------

    def _train_round(self, msg: m.DeviceRound) -> m.DeviceRound | None:
        """Train one round to its end (its update taken); returns the next round's work if
        it arrived early (the central went on without this device)."""
        plan = msg.round_plan
        r = plan.round
        start_weights = {k: v.clone() for k, v in msg.weights.items()}
        if set(start_weights) != set(self.keys):
            raise RemoteProtocolError(f"device {self.name}: round {r} weights do not fit the model")
        batches = round_batches(len(self.x), plan.batch_size, local_epochs=plan.local_epochs,
                                seed=self.cfg.run["seed"], device=self.name, round=r)
        steps = len(batches)
        model, opt = self._fresh(start_weights, plan)
        self.link.at(r, 0, steps)
        self.events.emit("round_start", round=r, steps=steps, edge=self.link.edge)
        t0 = time.perf_counter()
        step, restarts = 0, 0
        self.compute_s = self.throttle_s = 0.0
        while True:
            try:
                while step < steps:
                    self._moves_due(r, step, steps)
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
                    self.link.at(r, step, steps)
                train_seconds = time.perf_counter() - t0
                self.link.finish(m.DeviceDone(round=r, samples=len(self.x), steps=steps, train_seconds=train_seconds,
                                              weights=dict(model.state_dict())))
                self.events.emit("round_done", round=r, steps=steps, train_seconds=train_seconds, restarts=restarts,
                                 edge=self.link.edge, compute_seconds=self.compute_s,
                                 throttle_seconds=self.throttle_s)
                return None
            except Rollback as rb:
                # Only the round's start is kept on the device: going on from step 0 is the
                # round again from its weights (same batches, same seeds: the same result).
                if rb.step != 0:
                    raise RemoteProtocolError(f"{self.name}: asked to go on from step {rb.step}, which it cannot")
                self.events.emit("rollback", round=r, step=step, to=rb.step, how=rb.how)
                model, opt = self._fresh(start_weights, plan)
                step, restarts = 0, restarts + 1
                self.link.at(r, 0, steps)
            except RoundOver as ro:
                self.events.emit("round_over", round=r, step=step, delivered=ro.delivered, reason=str(ro))
                return ro.next

    def _fresh(self, weights: dict[str, torch.Tensor], plan: RoundPlan):
        full = build_model(self.cfg.model["name"], seed=0)
        model = full if self.mode == "classic" else split_model(full, self.cfg.model["split_layer"])[0]
        model.load_state_dict(weights)
        model.train()
        return model, make_optimizer(model.parameters(), lr=plan.lr, momentum=plan.momentum)

    def _split_step(self, model, opt, r: int, step: int, x: torch.Tensor, y: torch.Tensor) -> float:
        """One lockstep step with the edge; returns the device's own compute seconds (not
        the wait for the edge), which is what ``slowdown`` stretches."""
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        compute = time.perf_counter() - t0
        reply = self.link.step(r, step, out.detach(), y)
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

    def _moves_due(self, r: int, step: int, steps: int) -> None:
        """Every move due at this boundary, one after another. A move that cannot go on
        from here raises ``Rollback``/``RoundOver`` (from ``EdgeLink.move``). A radio loss
        from the trace (``[[mobility.drops]]``) cuts the link here; the next step finds it
        cut and reconnects as any lost link does."""
        drop = self.drops.due(r, step, steps)
        if drop is not None:
            self.link.cut(drop.seconds, drop.to, why="trace")
        while True:
            to = self.moves.due(r, step, steps)
            if to is None:
                return
            if to == self.link.edge:
                self.events.emit("move_skipped", to=to, round=r, step=step, reason="already there")
                continue
            self.link.move(to, r, step)


__all__ = ["DeviceClient", "TestbedError"]
