"""The central server: waits for its edges and devices, runs the rounds, FedAvg in a fixed
order, evaluates, writes the run folder.

Link threads (``central.edges``) put what happens on one queue; the round loop in ``run``
is its only reader, so every piece of round state lives in one thread. The round's
bookkeeping is ``central.rounds.RoundTracker`` (pure). Failures are data: an edge lost,
a device gone past its grace period, an update refused, each is recorded in
``summary.json`` and the run goes on with what arrived.
"""

from __future__ import annotations

import logging
import queue
import sys
import time
from typing import Any

import torch

from central import autosplit, checkpoint
from central.edges import EdgeJoined, EdgeLost, EdgeMessage, EdgeRegistry
from central.judge import Judge, update_problem
from central.returns import ClientReturns
from central.strategies import Failure, Strategy, make_strategy
from central.results import NO_SPACE, RunResults, fault_line, migration_line, progress_line, round_record, run_header
from central.rounds import RoundTracker
from central.runend import end_run
from central.runstatus import RunStopped
from common import messages as m
from common import transport
from common.config import Config
from common.errors import TransportError
from common.events import EventLog
from common.limits import refusal_reporter
from common.models import build_model, state_spec
from common.plan import RoundPlan
from common.security import Credentials
from common.text import printable_fields, printable_lines
from common.training import evaluate

log = logging.getLogger("central")

# The round loop wakes at least this often to check grace periods and deadlines.
POLL_S = 0.5


class RunAborted(Exception):
    """The run cannot go on (start-up timed out, or no device is left anywhere)."""


def _delivery(rep: m.FaultReport | m.MigrationReport, edge: str) -> dict[str, str]:
    """Who a report came from, for the record: the identity its edge stamped on it (the
    device's link it came on, or the edge itself) and the edge whose link delivered it."""
    return {"delivered_by": rep.delivered_by or f"edge {edge}", "via": edge}


class CentralServer:
    def __init__(self, cfg: Config, *, creds: Credentials, events: EventLog, run_name: str, run_dir: str,
                 test_set: tuple[torch.Tensor, torch.Tensor], shard_samples: dict[str, int] | None = None,
                 strategy: Strategy | None = None, out=sys.stdout, registry: EdgeRegistry | None = None,
                 resume: checkpoint.Checkpoint | None = None) -> None:
        self.cfg = cfg
        self.creds = creds
        self.events = events
        self.run_name = run_name
        self.test_x, self.test_y = test_set
        self.shard_samples = shard_samples or {}
        self.strategy = strategy or make_strategy(cfg.strategy)
        self.strategy.bind([n.removeprefix("layers.") for n, _ in build_model(cfg.model_key, seed=0).named_parameters()])
        self.strategy_state = dict(resume.strategy_state) if resume is not None else {}
        self.returns = ClientReturns(run_dir)  # what goes back to the aggregated devices (SCAFFOLD's delta_i)
        # split_layer = "auto": the cuts are chosen once, here (a resumed run keeps its own)
        self.auto = {} if cfg.mode == "classic" or resume is not None else autosplit.choose(cfg, self.shard_samples)
        self.out = out
        self.unsaid = 0  # progress lines stdout could not take
        self.faults = cfg.faults
        # The seam between the round logic and the network: tests stand a fake here.
        self.registry = registry or EdgeRegistry(edges=set(cfg.edges), run_name=run_name, mode=cfg.mode,
                                                 events=events, heartbeat_s=self.faults.heartbeat_s,
                                                 dead_after_s=self.faults.dead_after_s)
        self.attached: dict[str, set[str]] = {}   # live edge -> devices attached to it
        # devices last seen on an edge whose link to us is lost -> when it was lost: they
        # may be training still (only the edge's uplink broke); held for faults.central_grace_s
        self.orphans: dict[str, float] = {}
        self.early: dict[tuple[str, int], tuple[str, m.DeviceUpdate]] = {}  # updates of a round not started yet
        self.done_round = resume.round if resume is not None else 0      # the last round summed
        self.weights: dict[str, torch.Tensor] | None = None              # the global weights after it
        self.tracker: RoundTracker | None = None
        self.started = time.monotonic()
        self.spec = state_spec(cfg.model_key)
        self.handover = cfg.mobility.handover if cfg.mode == "fedfly" else cfg.mode
        self.results = RunResults(run_dir=run_dir, header=run_header(cfg, run_name=run_name, handover=self.handover,
                                                                    strategy=self.strategy.describe(), auto=self.auto))
        # updates refused for how far they moved the weights (``central.judge``), once a round's are in
        self._judge = Judge(factor=cfg.strategy["refuse_factor"], results=self.results, events=events, say=self.say)
        self.resume = resume
        if resume is not None:
            self._resumed_from(resume)

    def _resumed_from(self, ck: checkpoint.Checkpoint) -> None:
        """Go on from a checkpoint: the results as they stood after its round, and the
        restart recorded as a fault of the central."""
        down = self.results.resumed(ck.summary, ck.round)
        self._fault({"kind": "restarted", "process": "central", "peer": "central", "round": ck.round + 1,
                     "detail": f"resumed from the checkpoint of round {ck.round}"
                               + (f"; round {ck.round + 1} again with its plan" if ck.plan else ""),
                     "down_s": round(down, 3), "recovery": "checkpoint", "samples_lost": 0}, say=True)

    def say(self, text: str) -> None:
        try:  # lines quote what peers reported: no escape of theirs reaches the terminal
            print(printable_lines(text), file=self.out, flush=True)
        except (OSError, ValueError):  # a closed or full stdout must not stop the run: the files say it all
            self.unsaid += 1

    def _checkpoint(self, save, *args) -> bool:
        """A checkpoint that cannot be written for a while (no descriptor) costs a resume
        point, not the run: recorded, and the run goes on (False). No space on the disk
        raises the ``OSError``: it does not free itself, and a run whose results cannot be
        kept is not run on for nothing (the previous checkpoint stays whole)."""
        try:
            save(*args)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise
            self.events.emit("checkpoint_failed", what=save.__name__, detail=str(exc)[:200])
            log.warning("checkpoint not written: %s", exc)
            return False
        return True

    def _now(self) -> float:
        return round(time.monotonic() - self.started, 3)

    # -- events ------------------------------------------------------------------------------

    @property
    def present(self) -> set[str]:
        """Devices attached to some live edge."""
        return set().union(*self.attached.values()) if self.attached else set()

    def held(self, now: float) -> frozenset[str]:
        """Devices not seen because their edge's link to us is down, for at most
        ``faults.central_grace_s`` (the time an edge has to rejoin)."""
        present = self.present
        for d in [d for d in self.orphans if d in present]:
            del self.orphans[d]
        return frozenset(d for d, t in self.orphans.items() if now - t < self.faults.central_grace_s)

    def _pump(self, timeout: float) -> None:
        """Handle every event that arrives within ``timeout`` (at least one wait)."""
        try:
            ev = self.registry.queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        while True:
            self._handle(ev)
            try:
                ev = self.registry.queue.get_nowait()
            except queue.Empty:
                return

    def _handle(self, ev: object) -> None:
        if isinstance(ev, EdgeJoined):
            self.attached.setdefault(ev.edge, set())
            self.events.emit("edge_joined", edge=ev.edge, rejoin=ev.rejoin)
            if ev.rejoin:
                self._fault({"kind": "edge_back", "process": "central", "peer": ev.edge,
                             "detail": f"edge {ev.edge} joined again"}, say=True)
        elif isinstance(ev, EdgeLost):
            now = time.monotonic()
            for d in self.attached.pop(ev.edge, set()):
                self.orphans.setdefault(d, now)
            kind = "peer_silent" if ev.silent_s else "edge_lost"
            self._fault({"kind": kind, "process": "central", "peer": ev.edge, "detail": ev.detail[:200],
                         "detected_s": round(ev.silent_s, 3)}, say=True)
        elif isinstance(ev, EdgeMessage):
            msg = ev.msg
            if isinstance(msg, m.EdgeStatus):
                if ev.edge in self.registry.live:
                    self.attached[ev.edge] = set(msg.attached) & set(self.cfg.devices)
            elif isinstance(msg, m.DeviceUpdate):
                self._on_update(ev.edge, msg)
            elif isinstance(msg, m.MigrationReport):
                self._record_migration(msg, via=ev.edge)
            elif isinstance(msg, m.FaultReport):  # recorded with every field it has, as it came
                self._fault({**m.to_wire(msg)[0], **_delivery(msg, ev.edge)}, say=True)
            elif isinstance(msg, m.ErrorNotice):
                self.events.emit("edge_error", edge=ev.edge, kind=msg.kind, detail=msg.detail[:200])
            else:
                self.events.emit("unexpected", edge=ev.edge, type=msg.TYPE)
        if self.tracker is not None:
            self.tracker.presence(self.present, time.monotonic())

    def _fault(self, rec: dict[str, Any], *, say: bool = False) -> None:
        # peers' words escaped before any line is made of them: a newline in one must not start a line
        rec = printable_fields({"at_s": self._now(), **rec})
        self.results.add_fault(rec)
        self.events.emit("fault", **rec)
        if say:
            self.say(fault_line(rec))

    def _record_migration(self, rep: m.MigrationReport, *, via: str) -> None:
        rec = printable_fields({"device": rep.device, "from": rep.source, "to": rep.target, "round": rep.round,
                                "step": rep.step, "mode": rep.mode, "handover": self.handover, "how": rep.how,
                                "pause_ms": round(rep.pause_ms, 3),
                                "state_bytes": rep.state_bytes, "transfer_ms": round(rep.transfer_ms, 3),
                                **_delivery(rep, via)})
        self.results.add_migration(rec)
        self.events.emit("migration", **rec)
        self.say(migration_line(rec))

    def _on_update(self, edge: str, msg: m.DeviceUpdate) -> None:
        tracker = self.tracker
        verdict = tracker.offer(msg.device, msg.round) if tracker is not None else "no round running"
        if verdict in ("no round running", "from the future") and msg.round > self.done_round:
            # A round this central has not started yet (a resumed central, before its first
            # round starts, gets the updates its edges kept): held for that round.
            self.early[(msg.device, msg.round)] = (edge, msg)
            self.events.emit("update_held", device=msg.device, edge=edge, round=msg.round)
        elif verdict == "take":
            problem = self._check_update(msg)
            if problem:
                # dropped at once: its update was acknowledged, nothing else comes from it this round
                x = tracker.refuse(msg.device, f"update refused: {problem}",  # type: ignore[union-attr]
                                   time.monotonic())
                self._judge.refuse(msg.round, msg.device, edge, problem, x.samples if x else 0)
            else:
                tracker.take(msg.device, msg)  # type: ignore[union-attr]
        elif verdict == "late":
            self.results.add_failure({"round": msg.round, "device": msg.device, "edge": edge,
                                      "reason": "update came after the device was dropped from the round"})
            self.events.emit("update_late", device=msg.device, edge=edge, round=msg.round)
        else:
            self.events.emit("update_ignored", device=msg.device, edge=edge, round=msg.round, why=verdict)
        # Acknowledged in every case: the edge stops sending it; what was refused is recorded.
        self.registry.send(edge, m.UpdateAck(round=msg.round, device=msg.device))

    def _check_update(self, msg: m.DeviceUpdate) -> str:
        """Why an update may not be summed ("" if it may): ``central.judge.update_problem``."""
        return update_problem(msg, devices=self.cfg.devices, spec=self.spec, shard_samples=self.shard_samples)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> int:
        """The run, start to end; the exit status (``central.runstatus.exit_code``). However
        it ends (every round done, a signal, a failure), summary.json says how, with what
        was completed until then, and the edges are told to shut down."""
        c = self.cfg.central
        status, reason, signame, listener = "failed", "", "", None
        try:
            listener = transport.Listener(c.listen_host, c.port, creds=self.creds, handler=self.registry.serve,
                                          name="central", handshake_timeout=self.faults.dead_after_s,
                                          on_reject=refusal_reporter(events=self.events)).start()
            self.events.emit("listening", host=c.listen_host, port=c.port, run=self.run_name)
            if self.resume is not None:
                self.weights, first = dict(self.resume.weights), self.resume.round + 1
                if self.resume.rng is not None:
                    torch.set_rng_state(self.resume.rng)
            else:
                self.weights, first = dict(build_model(self.cfg.model_key, seed=self.cfg.run.seed).state_dict()), 1
                # round 0: a central that dies before its first round ends can be resumed too
                self._checkpoint(checkpoint.save, self.results.run_dir, 0, dict(self.weights), self.results.summary)
            # summary.json from the start (after the checkpoint: a central started again
            # finds one to resume, not only a run name in use)
            self.results.write()
            self._wait_for_testbed()
            self._rounds(dict(self.weights), first=first)
            status = "finished"
        except RunStopped as exc:
            status, signame = "stopped", exc.signame
            done = self.results.summary["rounds"]
            reason = f"{exc.signame} after round {done[-1]['round'] if done else 0} of {self.cfg.training.rounds}"
        except RunAborted as exc:
            reason = str(exc)
            self.results.add_failure({"reason": reason})
        except TransportError as exc:  # the listener could not start
            reason = str(exc)
        except OSError as exc:  # summary.json cannot be written (a full disk): the run cannot be kept
            reason = f"the results cannot be written in {self.results.run_dir}: {exc}"
        except Exception as exc:  # noqa: BLE001 - a bug must still leave a summary that says so
            log.exception("central: the run failed")
            reason = f"{type(exc).__name__}: {exc}"[:500]
        return end_run(self.results, self.weights, status=status, reason=reason, signame=signame,
                       registry=self.registry, listener=listener, events=self.events, say=self.say)

    def _wait_for_testbed(self) -> None:
        deadline = time.monotonic() + self.cfg.run.startup_timeout
        want_edges, want_devices = set(self.cfg.edges), set(self.cfg.devices)
        self.say(f"central: waiting for {len(want_edges)} edges and {len(want_devices)} devices")
        while True:
            joined = self.registry.live
            if joined == want_edges and self.present >= want_devices:
                break
            if time.monotonic() >= deadline:
                missing = sorted(want_edges - joined) + sorted(want_devices - self.present)
                raise RunAborted("timed out waiting for the testbed to come up (missing: " + ", ".join(missing) + ")")
            self._pump(min(POLL_S, deadline - time.monotonic()))
        self.events.emit("testbed_ready", edges=sorted(want_edges), devices=sorted(want_devices))

    def _await_devices(self, r: int) -> set[str]:
        """Devices attached now; if none is, wait for one (at most the round timeout)."""
        deadline = time.monotonic() + self.cfg.run.round_timeout
        while not self.present:
            if time.monotonic() >= deadline:
                raise RunAborted(f"no device is attached to any edge for round {r}")
            self._pump(min(POLL_S, deadline - time.monotonic()))
        return self.present

    def _auto_cuts(self) -> dict[str, int]:
        """The cuts chosen at start ("auto"), for every round's plan."""
        return {d: rec["cut"] for d, rec in self.results.summary.get("auto_split", {}).items()}

    def _rounds(self, weights: dict[str, torch.Tensor], first: int = 1) -> dict[str, torch.Tensor]:
        t = self.cfg.training
        rounds = t.rounds
        for r in range(first, rounds + 1):
            self._pump(0.0)
            replan = self.resume.plan if self.resume is not None and self.resume.plan is not None and \
                self.resume.plan.round == r else None
            if replan is not None:
                # the round a crash cut short, again with the plan it had: its participants
                # are training it still (or have finished: their edges send the updates again)
                participants = set(replan.participants)
            else:
                participants = self._await_devices(r)
            t0 = time.monotonic()
            plan = replan or RoundPlan(round=r, lr=t.lr, momentum=t.momentum, batch_size=t.batch_size,
                                       local_epochs=t.local_epochs, participants=tuple(sorted(participants)),
                                       cuts=self._auto_cuts(), algo=self.strategy.algo())
            self._checkpoint(checkpoint.save_plan, self.results.run_dir, plan)
            returned, adopt = self.returns.outgoing(self.strategy_state, plan.participants)
            start = m.RoundStart(plan=plan.to_wire(), weights=weights, adopt=adopt,
                                 algo={**self.strategy.round_tensors(self.strategy_state), **returned})
            self.events.emit("round_start", round=r, participants=list(plan.participants))
            tracker = RoundTracker(round=r, participants=frozenset(participants), shard_samples=self.shard_samples,
                                   grace_s=self.faults.device_grace_s, started=t0)
            self.tracker = tracker
            self.registry.greeting = start
            self.registry.broadcast(start)
            early, self.early = self.early, {}
            for (_d, rnd), (edge, upd) in sorted(early.items()):
                if rnd == r:
                    self._on_update(edge, upd)
                elif rnd > r:
                    self.early[(_d, rnd)] = (edge, upd)
            absent = sorted(set(self.cfg.devices) - participants)
            for d in absent:
                self._fault({"kind": "device_dropped", "process": "central", "peer": d, "round": r,
                             "detail": "attached to no edge when the round started; it rejoins at a later round",
                             "samples_lost": self.shard_samples.get(d, 0)}, say=True)
            self._collect(tracker, t0 + self.cfg.run.round_timeout)
            self.tracker = None
            self.done_round = r
            seconds = time.monotonic() - t0
            updates = {d: u for d, u in tracker.updates.items()}
            ratio_max, refused = self._judge(r, weights, updates)
            order = sorted(updates)  # the fixed order of summation
            if updates:
                failures = [Failure(x.device, x.reason, x.samples) for x in tracker.dropped.values()]
                results = [(updates[d].weights, updates[d].samples) for d in order]
                clients = [(d, updates[d].steps) for d in order]
                weights, state, returns = self.strategy.conclude(results, failures, current=weights,
                                                                 state=self.strategy_state, clients=clients, lr=plan.lr)
                # what goes back to each aggregated device, on disk before the checkpoint names it
                self.strategy_state = self.returns.keep(r, returns, state)
                self.weights = weights
            model = build_model(self.cfg.model_key, seed=0)
            model.load_state_dict(weights)
            t_eval = time.monotonic()
            acc, loss = evaluate(model, self.test_x, self.test_y)
            rec = round_record(r, seconds=seconds, eval_started=t_eval, accuracy=acc, loss=loss, updates=updates,
                               devices=self.cfg.devices, dropped=tracker.dropped.values(), absent=absent,
                               refused=refused, shard_samples=self.shard_samples, ratio_max=ratio_max)
            for d, rec_d in self.results.summary.get("auto_split", {}).items():  # measured beside predicted
                if d in updates:
                    rec_d["measured_train_s"].append(round(updates[d].train_seconds, 4))
            self.results.add_round(rec, {d: {"samples": u.samples, "train_seconds": u.train_seconds,
                                             "steps": u.steps, "edge": u.edge} for d, u in updates.items()})
            if self._checkpoint(checkpoint.save, self.results.run_dir, r, weights, self.results.summary,
                                self.strategy_state):
                self.returns.prune(self.strategy_state)
            self.events.emit("round_done", **{k: v for k, v in rec.items() if k != "devices"})
            moves = sum(1 for mv in self.results.summary["migrations"] if mv["round"] == r)
            elapsed = time.monotonic() - self.results.started
            self.say(progress_line(rec, rounds, elapsed / r * (rounds - r), moves))
        self.registry.greeting = None
        return weights

    def _collect(self, tracker: RoundTracker, deadline: float) -> None:
        tracker.presence(self.present, time.monotonic())
        while not tracker.complete:
            now = time.monotonic()
            held = self.held(now)
            for x in tracker.expire(now, held):
                self._fault({"kind": "device_dropped", "process": "central", "peer": x.device, "round": tracker.round,
                             "detail": x.reason, "samples_lost": x.samples}, say=True)
            if tracker.complete:
                break
            if now >= deadline:
                for d in tracker.waiting_for:
                    x = tracker.drop(d, "no update before run.round_timeout", now)
                    if x is not None:
                        self._fault({"kind": "device_dropped", "process": "central", "peer": d,
                                     "round": tracker.round, "detail": x.reason, "samples_lost": x.samples}, say=True)
                break
            wake = min(deadline, tracker.next_deadline(held) or deadline, now + POLL_S)
            self._pump(wake - now)
