"""The device: its data shard, its part of the model, and the training loop.

Per round: the round's work comes from the edge (``EdgeLink.wait_round``); then, for each
step, "maybe move; step": a move source may send the device to another edge at this
boundary, then the batch's activations go out and the gradient at the cut comes back
(mode classic trains the whole model locally). Everything about links, drops and
reattaching is ``device.link.EdgeLink``'s; what reaches this loop is where to go on from
(``Rollback``) or that the round is over for this device (``RoundOver``).
"""

from __future__ import annotations

import copy
import logging
import os
import time

import torch

from common import messages as m
from common import resolver
from common.bounds import gradient_problem
from common.config import Config
from common.errors import ProtocolError, RemoteProtocolError, TestbedError, TransportError
from common.events import EventLog
from common.models import build_model, part_keys, split_model, state_spec, weights_problem
from common.plan import RoundPlan
from common.security import Credentials
from common.training import LOSS, make_optimizer, round_batches
from device.control import ControlServer, Position
from device.link import EdgeLink, EdgeUnreachable, Rollback, RoundOver, RunOver
from device import state as disk
from device.moves import CommandedMoves, MoveSources, ScheduledDrops, ScheduledMoves, TimedMoves

log = logging.getLogger("device")


class DeviceClient:
    def __init__(self, cfg: Config, name: str, *, creds: Credentials, events: EventLog,
                 data: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.cfg = cfg
        self.name = name
        self.creds = creds
        self.events = events
        self.x, self.y = data
        self.mode = cfg.mode
        self.me = cfg.devices[name]
        self.pos = Position(edge=self.me.edge)
        self.link = EdgeLink(cfg=cfg, name=name, creds=creds, events=events, pos=self.pos)
        self.moves = MoveSources(ScheduledMoves(cfg.moves_for(name)), TimedMoves(cfg.timed_moves_for(name)),
                                 CommandedMoves(self.pos))
        self.drops = ScheduledDrops(cfg.drops_for(name))
        # faults.checkpoint_steps (mode fedfly): the device part and its optimizer every K
        # steps, in memory, so that the round can go back to a step its edge's buddy holds
        self.checkpoint_steps = cfg.faults["checkpoint_steps"] if self.mode == "fedfly" else 0
        self.state_dir = disk.folder(cfg.run["out"], name)
        self.writer = disk.Writer(self.state_dir) if self.checkpoint_steps else None
        self._round_ctx: tuple[RoundPlan, dict[str, torch.Tensor]] | None = None
        self.compute_s = 0.0   # this round's own compute, and the sleep that stretched it
        self.throttle_s = 0.0
        self._set_cut(cfg.base_cut if cfg.split_of(name) == "auto" else cfg.split_of(name))

    def _set_cut(self, cut: int) -> None:
        """Cut the model at ``cut`` (config, or the round plan's for split_layer = "auto")."""
        self.split = cut
        keys = part_keys(self.cfg.model_key, cut)
        self.keys = keys[0] + keys[1] if self.mode == "classic" else keys[0]

    # -- life cycle ----------------------------------------------------------------------

    def run(self) -> int:
        # every edge's name, looked up now: a move must not wait for a name server
        resolver.warm((e.host, e.port) for e in self.cfg.edges.values())
        control = ControlServer(host=self.me.control.listen_host, port=self.me.control_port, creds=self.creds,
                                device=self.name, edges=list(self.cfg.edges), pos=self.pos, events=self.events,
                                cut=self.link.cut, handshake_timeout=self.cfg.faults["dead_after_s"],
                                on_move=self.link.preconnect if self.cfg.preconnect else None).start()
        try:
            saved = disk.load(self.state_dir) if self.checkpoint_steps else None
            if saved is not None:
                # A process started again: go on from the step saved, if the edges agree.
                self.link.edge, self.link.last_round, self.link.run_hint = saved.edge, saved.last_round, saved.run
                self.link.at(saved.round, saved.step, saved.steps)
                self.link.checkpoints = sorted({0, saved.step})
            reply = self.link.join()
            resume = None
            if saved is not None:
                if reply.run_name == saved.run and reply.action == "continue" and reply.round == saved.round \
                        and reply.resume_step in (0, saved.step):
                    resume = (saved, reply.resume_step)
                    self.events.emit("resumed_from_disk", round=saved.round, step=saved.step,
                                     resume_step=reply.resume_step, how=reply.how)
                    try:
                        age = time.time() - os.path.getmtime(os.path.join(self.state_dir, disk.META))
                    except OSError:
                        age = 0.0
                    self.link.report(m.FaultReport(
                        kind="restarted", process=self.name, peer=self.link.edge, round=saved.round,
                        step=reply.resume_step, detail=f"process started again; checkpoint of step {saved.step} "
                        f"(written {age:.1f} s before), the edge went on from step {reply.resume_step} ({reply.how})",
                        detected_s=0.0, down_s=round(age, 3), replayed=0,
                        recovery="disk checkpoint" if reply.resume_step else "restart", samples_lost=0))
                else:
                    if reply.action == "done" and reply.run_name == saved.run:
                        self.link.last_round = max(self.link.last_round, saved.round)
                    self.events.emit("checkpoint_unused", round=saved.round, step=saved.step, action=reply.action,
                                     how=reply.how, run=saved.run)
                    self.writer.clear()
            work: m.DeviceRound | None = None
            while True:
                if resume is not None:
                    saved, at = resume
                    resume = None
                    work = self._train_round(m.DeviceRound(plan=saved.plan.to_wire(), weights=saved.start),
                                             resume=(saved, at))
                    continue
                if work is None:
                    self.link.at(self.link.last_round, 0, 0, in_round=False)
                    work = self.link.wait_round()
                work = self._train_round(work)
        except RunOver as exc:
            self.events.emit("shutdown", reason=str(exc))
            if self.writer is not None:
                self.writer.clear()
            return 0
        except (EdgeUnreachable, TransportError, ProtocolError) as exc:
            log.error("%s: %s", self.name, exc)
            self.events.emit("error", detail=str(exc)[:300], error=type(exc).__name__)
            return 1
        finally:
            control.close()
            self.link.close()

    # -- a round -------------------------------------------------------------------------

    def _train_round(self, msg: m.DeviceRound, resume: tuple[disk.Saved, int] | None = None) -> m.DeviceRound | None:
        """Train one round to its end (its update taken); returns the next round's work if
        it arrived early (the central went on without this device)."""
        plan = msg.round_plan
        r = plan.round
        if self.name in plan.cuts and plan.cuts[self.name] != self.split:
            self._set_cut(plan.cuts[self.name])
        start_weights = {k: v.clone() for k, v in msg.weights.items()}
        spec = state_spec(self.cfg.model_key)
        if weights_problem(start_weights, {k: spec[k] for k in self.keys}):  # load_state_dict would raise RuntimeError
            raise RemoteProtocolError(f"device {self.name}: round {r} weights do not fit the model")
        batches = round_batches(len(self.x), plan.batch_size, local_epochs=plan.local_epochs,
                                seed=self.cfg.run["seed"], device=self.name, round=r)
        steps = len(batches)
        model, opt = self._fresh(start_weights, plan)
        ckpts: dict[int, tuple[dict, dict]] = {}
        self._ckpts = ckpts
        self._round_ctx = (plan, start_weights)
        self._keep(ckpts, 0, model, opt)
        step, restarts = 0, 0
        if resume is not None and resume[1]:
            saved, step = resume
            model.load_state_dict(saved.model)
            opt.load_state_dict(copy.deepcopy(saved.optimizer))
            ckpts[step] = ({k: v.clone() for k, v in saved.model.items()}, copy.deepcopy(saved.optimizer))
            self.link.checkpoints = sorted(ckpts)
        self.link.at(r, step, steps)
        self.events.emit("round_start", round=r, steps=steps, edge=self.link.edge, step=step)
        t0 = time.perf_counter()
        self.compute_s = self.throttle_s = 0.0
        step_ms: list[float | None] = [None] * steps  # wall time of each step, the wait for the edge included
        while True:
            try:
                while step < steps:
                    self._moves_due(r, step, steps, model, opt)
                    idx = batches[step]
                    t_wall = time.perf_counter()
                    if self.mode == "classic":
                        t_step = time.perf_counter()
                        opt.zero_grad(set_to_none=True)
                        LOSS(model(self.x[idx]), self.y[idx]).backward()
                        opt.step()
                        compute = time.perf_counter() - t_step
                    else:
                        compute = self._split_step(model, opt, r, step, self.x[idx], self.y[idx], steps)
                    step_ms[step] = round((time.perf_counter() - t_wall) * 1000, 2)
                    self._throttle(compute)
                    step += 1
                    if self.checkpoint_steps and step % self.checkpoint_steps == 0:
                        self._keep(ckpts, step, model, opt)
                    self.link.at(r, step, steps)
                train_seconds = time.perf_counter() - t0
                self.link.finish(m.DeviceDone(round=r, samples=len(self.x), steps=steps, train_seconds=train_seconds,
                                              weights=dict(model.state_dict())))
                if self.writer is not None:
                    self.writer.clear()  # the round's update is taken: nothing to go back to
                self.events.emit("round_done", round=r, steps=steps, train_seconds=train_seconds, restarts=restarts,
                                 edge=self.link.edge, compute_seconds=self.compute_s,
                                 throttle_seconds=self.throttle_s, step_ms=step_ms)
                return None
            except Rollback as rb:
                # Back to a step the device kept (0: the round's start; others with
                # faults.checkpoint_steps): the steps since are trained again with the same
                # batches and seeds, so the result is the same.
                if rb.step not in ckpts:
                    raise RemoteProtocolError(f"{self.name}: asked to go on from step {rb.step}, which it cannot "
                                              f"(it kept steps {sorted(ckpts)})")
                self.events.emit("rollback", round=r, step=step, to=rb.step, how=rb.how)
                model, opt = self._fresh(start_weights, plan)
                if rb.step:
                    state, opt_state = ckpts[rb.step]
                    model.load_state_dict(state)
                    opt.load_state_dict(copy.deepcopy(opt_state))
                for later in [c for c in ckpts if c > rb.step]:
                    del ckpts[later]
                self.link.checkpoints = sorted(ckpts)
                step, restarts = rb.step, restarts + 1
                self.link.at(r, step, steps)
            except RoundOver as ro:
                self.events.emit("round_over", round=r, step=step, delivered=ro.delivered, reason=str(ro))
                return ro.next

    # how many checkpoints besides the round's start a device keeps: the buddy's copy lags
    # the live session by at most the time a copy takes to send
    KEEP = 3

    def _keep(self, ckpts: dict[int, tuple[dict, dict]], step: int, model, opt) -> None:
        if step:
            ckpts[step] = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                           copy.deepcopy(opt.state_dict()))
            for old in sorted(c for c in ckpts if c)[:-self.KEEP]:
                del ckpts[old]
            if self.writer is not None and self._round_ctx is not None and self.link.run_name:
                plan, start = self._round_ctx
                w = self.link.where
                self.writer.submit(run=self.link.run_name, round=plan.round, step=step, steps=w.steps,
                                   edge=self.link.edge, last_round=self.link.last_round, plan=plan, start=start,
                                   model=ckpts[step][0], optimizer=ckpts[step][1])
        else:
            ckpts[0] = ({}, {})
        self.link.checkpoints = sorted(ckpts)

    def _fresh(self, weights: dict[str, torch.Tensor], plan: RoundPlan):
        full = build_model(self.cfg.model_key, seed=0)
        model = full if self.mode == "classic" else split_model(full, self.split)[0]
        model.load_state_dict(weights)
        model.train()
        return model, make_optimizer(model.parameters(), lr=plan.lr, momentum=plan.momentum, prox_mu=plan.prox_mu)

    def _split_step(self, model, opt, r: int, step: int, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
        """One lockstep step with the edge; returns the device's own compute seconds (not
        the wait for the edge), which is what ``slowdown`` stretches."""
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        compute = time.perf_counter() - t0
        reply = self.link.step(r, step, out.detach(), y)
        grad = reply.grad.get("g")
        if problem := gradient_problem(grad, out):  # the edge's answer, bounded as our batch is
            raise RemoteProtocolError(f"device {self.name}: step {step}: {problem}")
        self._announce(r, step, steps)
        t1 = time.perf_counter()
        out.backward(grad)
        opt.step()
        return compute + time.perf_counter() - t1

    def _announce(self, r: int, step: int, steps: int) -> None:
        """A scheduled move at the boundary after ``step``: tell the edge now (its gradient
        for ``step`` is in, the device's backward pass is still to come), so that the
        session travels while the device computes (``EdgeLink.announce``). Not when a
        radio loss of the trace falls on that boundary too (the device would not leave
        from here), nor after the round's last step (no move follows it)."""
        if self.mode != "fedfly" or not self.cfg.offer or step + 1 >= steps or \
                self.drops.ahead(r, step, steps) is not None:
            return
        to = self.moves.upcoming(r, step, steps)
        if to is not None:
            self.link.announce(to, r, step + 1)

    def _throttle(self, compute_s: float) -> None:
        """Emulate a slower device: stretch each step's compute by ``slowdown``."""
        self.compute_s += compute_s
        if self.me.slowdown > 1:
            pause = compute_s * (self.me.slowdown - 1)
            self.throttle_s += pause
            time.sleep(pause)

    # -- moves ---------------------------------------------------------------------------

    def _moves_due(self, r: int, step: int, steps: int, model=None, opt=None) -> None:
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
                break
            if to == self.link.edge:
                self.events.emit("move_skipped", to=to, round=r, step=step, reason="already there")
                continue
            if self.checkpoint_steps and model is not None and step not in self._ckpts:
                # the source keeps a copy of what it hands over: a point to come back to
                self._keep(self._ckpts, step, model, opt)
            self.link.move(to, r, step)
        if self.cfg.preconnect:
            ahead = self.moves.upcoming(r, step, steps)
            if ahead is not None and ahead != self.link.edge:
                self.link.preconnect(ahead)


__all__ = ["DeviceClient", "TestbedError"]
