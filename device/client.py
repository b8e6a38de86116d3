"""The device: its data shard, its part of the model, and the training loop.

Per round: the round's work comes from the edge (``EdgeLink.wait_round``); then "maybe
move; step" at every boundary (a move source may send the device to another edge there;
then the batch's activations go out and the gradient at the cut comes back, or mode
classic trains the whole model locally), and "maybe finish" after the last step (the
update, until the central has it). Everything about links, drops and reattaching is
``device.link.EdgeLink``'s; what reaches this loop is a value (``device.outcomes``): go
on, go back to a step it kept (``Rollback``), or the round or the run is over.

An algorithm that keeps a state on the device between rounds (SCAFFOLD's ``c_i``) keeps
it here (``kept``, on the disk too): each round's start folds in what the central
returned (``_fold``), and its edge part goes to the edge (``ClientState``)."""

from __future__ import annotations

import copy
import logging
import os
import time
from dataclasses import dataclass, field

import torch

from common import messages as m
from common import resolver
from common.bounds import gradient_problem
from common.config import Config
from common.errors import ProtocolError, RemoteProtocolError, TestbedError, TransportError
from common.events import EventLog
from common.footprint import backward
from common.models import build_model, empty_part, part_keys, split_model, state_spec, weights_problem
from common.plan import RoundPlan
from common.security import Credentials
from common.strategies import strategy_class
from common.strategies.base import ClientStep, KeptState
from common.training import LOSS, make_optimizer, named_parameters, round_batches
from device.control import ControlServer, Position
from device import state as disk
from device.link import EdgeLink
from device.moves import CommandedMoves, MoveSources, ScheduledDrops, ScheduledMoves, TimedMoves
from device.outcomes import Delivered, Ends, NoEdge, Outcome, Rollback, RoundOver, RunOver, TrainFrom

log = logging.getLogger("device")


@dataclass(slots=True)
class _Round:
    """One round under way: its model and optimizer, the step the loop is at, and the
    steps it can go back to (``ckpts``: step -> model and optimizer state; 0: the round's
    start, which ``start`` is)."""
    plan: RoundPlan
    start: dict[str, torch.Tensor]
    batches: list
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    step_ms: list[float | None]  # wall time of each step, the wait for the edge included
    algo: dict[str, torch.Tensor] = field(default_factory=dict)  # its part's share of the round's tensors
    ckpts: dict[int, tuple[dict, dict]] = field(default_factory=dict)
    step: int = 0
    restarts: int = 0
    t0: float = 0.0
    train_seconds: float = 0.0

    @property
    def round(self) -> int:
        return self.plan.round

    @property
    def steps(self) -> int:
        return len(self.batches)


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
        self.checkpoint_steps = cfg.faults.checkpoint_steps if self.mode == "fedfly" else 0
        self.state_dir = disk.folder(cfg.run.out, name)
        self.writer = disk.Writer(self.state_dir) if self.checkpoint_steps else None
        self.compute_s = 0.0   # this round's own compute, and the sleep that stretched it
        self.throttle_s = 0.0
        # what the algorithm keeps between rounds (SCAFFOLD's c_i, the whole model): read
        # from the disk at the first round of the run (``_kept_state``), written at each fold
        self.kept: KeptState | None = None
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
                                cut=self.link.cut, handshake_timeout=self.cfg.faults.dead_after_s,
                                on_move=self.link.preconnect if self.cfg.mobility.preconnect else None).start()
        try:
            saved = disk.load(self.state_dir) if self.checkpoint_steps else None
            if saved is not None:
                # A process started again: go on from the step saved, if the edges agree.
                self.link.edge, self.link.last_round, self.link.run_hint = saved.edge, saved.last_round, saved.run
                self.link.at(saved.round, saved.step, saved.steps)
                self.link.checkpoints = sorted({0, saved.step})
            reply = self.link.join()
            end = self._rounds(self._from_disk(saved, reply) if saved is not None else None) \
                if isinstance(reply, m.AttachReply) else reply
            if isinstance(end, RunOver):
                self.events.emit("shutdown", reason=end.reason)
                if self.writer is not None:
                    self.writer.clear()
                return 0
            log.error("%s: %s", self.name, end.detail)
            self.events.emit("error", detail=end.detail[:300], error="NoEdge")
            return 1
        except (TransportError, ProtocolError) as exc:
            log.error("%s: %s", self.name, exc)
            self.events.emit("error", detail=str(exc)[:300], error=type(exc).__name__)
            return 1
        finally:
            control.close()
            self.link.close()

    def _from_disk(self, saved: disk.Saved, reply: m.AttachReply) -> tuple[disk.Saved, int] | None:
        """Where the round saved on disk goes on from (the checkpoint and the step the
        edge named), if the edge's answer agrees that it does; else the checkpoint is
        cleared."""
        if reply.run_name == saved.run and reply.action == "continue" and reply.round == saved.round \
                and reply.resume_step in (0, saved.step):
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
                down_s=round(age, 3), recovery="disk checkpoint" if reply.resume_step else "restart"))
            return saved, reply.resume_step
        if reply.action == "done" and reply.run_name == saved.run:
            self.link.last_round = max(self.link.last_round, saved.round)
        self.events.emit("checkpoint_unused", round=saved.round, step=saved.step, action=reply.action,
                         how=reply.how, run=saved.run)
        assert self.writer is not None  # (a checkpoint is read only with checkpoints on)
        self.writer.clear()
        return None

    def _rounds(self, resume: tuple[disk.Saved, int] | None) -> RunOver | NoEdge:
        """Round after round (the first one ``resume``d from disk, if given) until the run
        ends."""
        ended: Outcome | None = None
        if resume is not None:
            saved = resume[0]
            ended = self._train_round(m.DeviceRound(plan=saved.plan.to_wire(), weights=saved.start, algo=saved.algo,
                                                    adopt=self._kept_state().round), resume=resume)
        while not isinstance(ended, Ends):
            work = ended.next if isinstance(ended, RoundOver) else None  # the next round's, come early
            if work is None:
                self.link.at(self.link.last_round, 0, 0, in_round=False)
                work = self.link.wait_round()
                if isinstance(work, Ends):
                    return work
            ended = self._train_round(work)
        return ended

    # -- a round -------------------------------------------------------------------------

    def _train_round(self, work: m.DeviceRound, resume: tuple[disk.Saved, int] | None = None) -> Outcome:
        """Train one round to its end: maybe move; step; maybe finish. Returns how it
        ended: ``Delivered``, ``RoundOver`` (the central went on without this device;
        ``next``: the next round's work, if it came), ``RunOver`` or ``NoEdge``."""
        rnd = self._start_round(work, resume)
        while True:
            if rnd.step < rnd.steps:
                outcome = self._maybe_move(rnd) or self._step(rnd)
            else:
                outcome = self._finish(rnd)
            if isinstance(outcome, Rollback):
                self._roll_back(rnd, outcome)
            elif outcome is not None:
                return self._ended(rnd, outcome)

    def _start_round(self, work: m.DeviceRound, resume: tuple[disk.Saved, int] | None) -> _Round:
        """The round's model, batches and checkpoints, at step 0 or the step ``resume``d."""
        plan = work.round_plan
        r = plan.round
        if self.name in plan.cuts and plan.cuts[self.name] != self.split:
            self._set_cut(plan.cuts[self.name])
        start_weights = {k: v.clone() for k, v in work.weights.items()}
        spec = state_spec(self.cfg.model_key)
        if weights_problem(start_weights, {k: spec[k] for k in self.keys}):  # load_state_dict would raise RuntimeError
            raise RemoteProtocolError(f"device {self.name}: round {r} weights do not fit the model")
        if any(k.partition("/")[2] not in spec or (tuple(v.shape), v.dtype) != spec[k.partition("/")[2]]
               for k, v in work.algo.items()):
            raise RemoteProtocolError(f"device {self.name}: round {r} strategy tensors do not fit the model")
        client = strategy_class(plan.algo.name).CLIENT
        tag = client.returns_tag if client is not None else ""
        algo = {k: v.clone() for k, v in work.algo.items() if k.partition("/")[0] != tag and
                k.partition("/")[2] in self.keys}
        if client is not None and client.keeps_state:
            self._fold(work, client, resumed=resume is not None)
        batches = round_batches(len(self.x), plan.batch_size, local_epochs=plan.local_epochs,
                                seed=self.cfg.run.seed, device=self.name, round=r)
        model, opt = self._fresh(start_weights, plan, algo)
        rnd = _Round(plan=plan, start=start_weights, algo=algo, batches=batches, model=model, opt=opt,
                     step_ms=[None] * len(batches))
        self._keep(rnd, 0)
        if resume is not None and resume[1]:
            saved, rnd.step = resume
            model.load_state_dict(saved.model)
            opt.load_state_dict(copy.deepcopy(saved.optimizer))
            rnd.ckpts[rnd.step] = ({k: v.clone() for k, v in saved.model.items()}, copy.deepcopy(saved.optimizer))
            self.link.checkpoints = sorted(rnd.ckpts)
        self.link.at(r, rnd.step, rnd.steps)
        self.events.emit("round_start", round=r, steps=rnd.steps, edge=self.link.edge, step=rnd.step)
        rnd.t0 = time.perf_counter()
        self.compute_s = self.throttle_s = 0.0
        return rnd

    def _kept_state(self) -> KeptState:
        """What the algorithm keeps between rounds, from the disk for this run at first."""
        if self.kept is None:
            self.kept = disk.load_kept(self.state_dir, self.link.run_name or self.link.run_hint)
        return self.kept

    def _fold(self, work: m.DeviceRound, client: type[ClientStep], *, resumed: bool) -> None:
        """Fold in what the central returned for this device's last aggregated update,
        exactly once (``KeptState.adopt``), on the disk before the round trains; then the
        edge's part of the kept state goes to the edge (at once for a round the edge just
        sent; for a round resumed from the disk, if the edge asked for it)."""
        kept = self._kept_state()
        returns = {k: v for k, v in work.algo.items() if k.partition("/")[0] == client.returns_tag}
        try:
            folded = kept.adopt(client, work.adopt, returns, self._params())
        except ValueError as exc:
            raise RemoteProtocolError(f"device {self.name}: round {work.round_plan.round}: {exc}") from None
        if folded:
            disk.save_kept(self.state_dir, run=self.link.run_name or "", kept=kept)
            self.events.emit("state_folded", round=work.round_plan.round, adopt=kept.round)
        if self.mode != "classic":
            edge_keys = part_keys(self.cfg.model_key, self.split)[1]
            self.link.hold_state(m.ClientState(round=work.round_plan.round, state=kept.share(edge_keys)),
                                 now=not resumed)

    def _params(self) -> dict[str, torch.Tensor]:
        """The whole model's parameters by key, for a fold's shapes and dtypes: uninitialised
        (``empty_part``: no random initialisation) and not kept after the fold."""
        return {n: p.detach() for n, p in named_parameters(empty_part(self.cfg.model_key, 0))}

    def _step(self, rnd: _Round) -> Outcome | None:
        """Step ``rnd.step``: locally (mode classic) or with the edge. None: done, on to the
        next step; else what stopped it."""
        step = rnd.step
        idx = rnd.batches[step]
        t_wall = time.perf_counter()
        if self.mode == "classic":
            t_step = time.perf_counter()
            rnd.opt.zero_grad(set_to_none=True)
            LOSS(rnd.model(self.x[idx]), self.y[idx]).backward()
            rnd.opt.step()
            compute: float | Outcome = time.perf_counter() - t_step
        else:
            compute = self._split_step(rnd, self.x[idx], self.y[idx])
            if not isinstance(compute, float):
                return compute
        rnd.step_ms[step] = round((time.perf_counter() - t_wall) * 1000, 2)
        self._throttle(compute, rnd.round)
        rnd.step = step = step + 1
        if self.checkpoint_steps and step % self.checkpoint_steps == 0:
            self._keep(rnd, step)
        self.link.at(rnd.round, step, rnd.steps)
        return None

    def _finish(self, rnd: _Round) -> Outcome:
        """The round's update, until the central has it (``Delivered``)."""
        rnd.train_seconds = time.perf_counter() - rnd.t0
        return self.link.finish(m.DeviceDone(round=rnd.round, samples=len(self.x), steps=rnd.steps,
                                             train_seconds=rnd.train_seconds, weights=dict(rnd.model.state_dict())))

    def _roll_back(self, rnd: _Round, rb: Rollback) -> None:
        """Back to a step the device kept (0: the round's start; others with
        faults.checkpoint_steps): the steps since are trained again with the same batches
        and seeds, so the result is the same."""
        if rb.step not in rnd.ckpts:
            raise RemoteProtocolError(f"{self.name}: asked to go on from step {rb.step}, which it cannot "
                                      f"(it kept steps {sorted(rnd.ckpts)})")
        self.events.emit("rollback", round=rnd.round, step=rnd.step, to=rb.step, how=rb.how)
        rnd.model, rnd.opt = self._fresh(rnd.start, rnd.plan, rnd.algo)
        if rb.step:
            state, opt_state = rnd.ckpts[rb.step]
            rnd.model.load_state_dict(state)
            rnd.opt.load_state_dict(copy.deepcopy(opt_state))
        for later in [c for c in rnd.ckpts if c > rb.step]:
            del rnd.ckpts[later]
        self.link.checkpoints = sorted(rnd.ckpts)
        rnd.step, rnd.restarts = rb.step, rnd.restarts + 1
        self.link.at(rnd.round, rnd.step, rnd.steps)

    def _ended(self, rnd: _Round, outcome: Outcome) -> Outcome:
        """The round's end, on the record."""
        if isinstance(outcome, Delivered):
            if self.writer is not None:
                self.writer.clear()  # the round's update is taken: nothing to go back to
            self.events.emit("round_done", round=rnd.round, steps=rnd.steps, train_seconds=rnd.train_seconds,
                             restarts=rnd.restarts, edge=self.link.edge, compute_seconds=self.compute_s,
                             throttle_seconds=self.throttle_s, step_ms=rnd.step_ms)
        elif isinstance(outcome, RoundOver):
            self.events.emit("round_over", round=rnd.round, step=rnd.step, delivered=outcome.delivered,
                             reason=str(outcome))
        return outcome

    # how many checkpoints besides the round's start a device keeps: the buddy's copy lags
    # the live session by at most the time a copy takes to send
    KEEP = 3

    def _keep(self, rnd: _Round, step: int) -> None:
        """Keep step ``step`` of the round as a point to come back to (0: the round's start,
        which its weights are), on disk too with a writer."""
        ckpts = rnd.ckpts
        if step:
            ckpts[step] = ({k: v.detach().clone() for k, v in rnd.model.state_dict().items()},
                           copy.deepcopy(rnd.opt.state_dict()))
            for old in sorted(c for c in ckpts if c)[:-self.KEEP]:
                del ckpts[old]
            if self.writer is not None and self.link.run_name:
                self.writer.submit(run=self.link.run_name, round=rnd.round, step=step, steps=rnd.steps,
                                   edge=self.link.edge, last_round=self.link.last_round, plan=rnd.plan,
                                   start=rnd.start, algo=rnd.algo, model=ckpts[step][0], optimizer=ckpts[step][1])
        else:
            ckpts[0] = ({}, {})
        self.link.checkpoints = sorted(ckpts)

    def _fresh(self, weights: dict[str, torch.Tensor], plan: RoundPlan, algo: dict[str, torch.Tensor]):
        """The round's model and optimizer at its start: ``algo`` (the round's tensors for the
        part) and the kept state's share of it (the same all round: a fold comes only at a
        round's start)."""
        full = build_model(self.cfg.model_key, seed=0)
        model = full if self.mode == "classic" else split_model(full, self.split)[0]
        model.load_state_dict(weights)
        model.train()
        kept = self.kept.share(self.keys) if self.kept is not None else {}
        return model, make_optimizer(named_parameters(model), lr=plan.lr, momentum=plan.momentum, algo=plan.algo,
                                     tensors={**algo, **kept})

    def _split_step(self, rnd: _Round, x: torch.Tensor, y: torch.Tensor) -> float | Outcome:
        """One lockstep step with the edge; returns the device's own compute seconds (not
        the wait for the edge), which is what ``slowdown`` stretches, or the outcome that
        stopped the step (``EdgeLink.step``)."""
        model, opt = rnd.model, rnd.opt
        r, step = rnd.round, rnd.step
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        out = model(x)
        compute = time.perf_counter() - t0
        reply = self.link.step(r, step, out.detach(), y)
        if not isinstance(reply, m.Gradients):
            return reply
        grad = reply.grad.get("g")
        if problem := gradient_problem(grad, out):  # the edge's answer, bounded as our batch is
            raise RemoteProtocolError(f"device {self.name}: step {step}: {problem}")
        self._announce(r, step, rnd.steps)
        t1 = time.perf_counter()
        backward(out, grad)  # out.backward(grad) without importing sympy (common.footprint)
        opt.step()
        return compute + time.perf_counter() - t1

    def _announce(self, r: int, step: int, steps: int) -> None:
        """A scheduled move at the boundary after ``step``: tell the edge now (its gradient
        for ``step`` is in, the device's backward pass is still to come), so that the
        session travels while the device computes (``EdgeLink.announce``). Not when a
        radio loss of the trace falls on that boundary too (the device would not leave
        from here), nor after the round's last step (no move follows it)."""
        if self.mode != "fedfly" or not self.cfg.mobility.offer or step + 1 >= steps or \
                self.drops.ahead(r, step, steps) is not None:
            return
        to = self.moves.upcoming(r, step, steps)
        if to is not None:
            self.link.announce(to, r, step + 1)

    def _throttle(self, compute_s: float, round_: int) -> None:
        """Emulate a slower device: stretch each step's compute by ``slowdown`` (in the
        rounds of ``slowdown_rounds``; all when it is empty)."""
        self.compute_s += compute_s
        slowdown = self.me.slowdown_in(round_)
        if slowdown > 1:
            pause = compute_s * (slowdown - 1)
            self.throttle_s += pause
            time.sleep(pause)

    # -- moves ---------------------------------------------------------------------------

    def _maybe_move(self, rnd: _Round) -> Outcome | None:
        """Every move due at this boundary, one after another. None: train on here; else
        what a move gave instead (``EdgeLink.move``). A radio loss from the trace
        (``[[mobility.drops]]``) cuts the link here; the next step finds it cut and
        reconnects as any lost link does."""
        r, step, steps = rnd.round, rnd.step, rnd.steps
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
            if self.checkpoint_steps and step not in rnd.ckpts:
                # the source keeps a copy of what it hands over: a point to come back to
                self._keep(rnd, step)
            outcome = self.link.move(to, r, step)
            if not isinstance(outcome, TrainFrom):
                return outcome
        if self.cfg.mobility.preconnect:
            ahead = self.moves.upcoming(r, step, steps)
            if ahead is not None and ahead != self.link.edge:
                self.link.preconnect(ahead)
        return None


__all__ = ["DeviceClient", "TestbedError"]
