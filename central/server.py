"""The central server: waits for its edges and devices, runs the rounds, FedAvg in a fixed
order, evaluates, writes the run folder.

One thread per edge connection turns its messages into events on one queue; the round
loop in ``run`` is the only reader of that queue, so all round state lives in one thread.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch

from central.fedavg import FedAvg, Strategy
from central.results import RunResults, final_table, migration_line, progress_line
from common import messages as m
from common import transport
from common.config import Config
from common.errors import ConnectionClosed, ProtocolError, RemoteProtocolError, TransportError
from common.events import EventLog
from common.models import build_model, part_keys
from common.training import evaluate

log = logging.getLogger("central")


class RunAborted(Exception):
    """The run cannot go on (an edge was lost, nobody reported, start-up timed out)."""


@dataclass
class _Event:
    edge: str
    msg: m.Message | None  # None: the edge's connection is gone
    detail: str = ""


class CentralServer:
    def __init__(self, cfg: Config, *, key: bytes, events: EventLog, run_name: str, run_dir: str,
                 test_set: tuple[torch.Tensor, torch.Tensor], strategy: Strategy | None = None,
                 out=sys.stdout) -> None:
        self.cfg = cfg
        self.key = key
        self.events = events
        self.run_name = run_name
        self.test_x, self.test_y = test_set
        self.strategy = strategy or FedAvg()
        self.out = out
        self.queue: queue.Queue[_Event] = queue.Queue()
        self.edges: dict[str, transport.Connection] = {}
        self.edges_lock = threading.Lock()
        self.attached: dict[str, list[str]] = {}
        dev_keys, edge_keys = part_keys(cfg.model["name"], cfg.model["split_layer"])
        self.full_keys = set(dev_keys) | set(edge_keys)
        t = cfg.training
        self.results = RunResults(run_dir=run_dir, header={
            "run_name": run_name, "mode": cfg.mode, "config": cfg.path, "seed": cfg.run["seed"],
            "model": cfg.model["name"], "split_layer": cfg.model["split_layer"], "dataset": cfg.data["dataset"],
            "distribution": cfg.data["distribution"], "training": dict(t), "threads": t["threads"],
            "device_settings": {n: {"edge": d.edge, "slowdown": d.slowdown, "threads": cfg.device_threads(n)}
                                for n, d in sorted(cfg.devices.items())},
            "edges": sorted(cfg.edges), "torch": torch.__version__,
            "scheduled_moves": [vars(mv) for mv in cfg.moves]})

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- connections ---------------------------------------------------------------------

    def _serve_edge(self, conn: transport.Connection) -> None:
        try:
            hello = conn.recv(timeout=30)
            if not isinstance(hello, m.EdgeHello):
                raise RemoteProtocolError(f"central (new connection): {hello.TYPE} is not allowed first")
            if hello.edge not in self.cfg.edges:
                raise RemoteProtocolError(f"{hello.edge!r} is not an edge of this testbed")
            with self.edges_lock:
                if hello.edge in self.edges:
                    raise RemoteProtocolError(f"edge {hello.edge} is already connected")
                self.edges[hello.edge] = conn
            conn.peer = f"edge {hello.edge}"
            conn.send(m.Welcome(run_name=self.run_name, mode=self.cfg.mode))
            self.queue.put(_Event(hello.edge, hello))
        except (ProtocolError, TimeoutError) as exc:
            self.events.emit("protocol_error", peer=conn.peer, detail=str(exc))
            conn.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)))
            return
        except TransportError:
            return
        edge = hello.edge
        try:
            while True:
                self.queue.put(_Event(edge, conn.recv()))
        except ConnectionClosed as exc:
            self.queue.put(_Event(edge, None, str(exc)))
        except (ProtocolError, TransportError) as exc:
            conn.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)))
            self.queue.put(_Event(edge, None, str(exc)))

    def _next_event(self, deadline: float, waiting_for: str) -> _Event:
        left = deadline - time.monotonic()
        try:
            ev = self.queue.get(timeout=max(0.0, left))
        except queue.Empty:
            raise RunAborted(f"timed out waiting for {waiting_for}") from None
        if ev.msg is None:
            raise RunAborted(f"lost edge {ev.edge}: {ev.detail}")
        if isinstance(ev.msg, m.EdgeStatus):
            self.attached[ev.edge] = ev.msg.attached
        elif isinstance(ev.msg, m.MigrationReport):
            self._record_migration(ev.msg)
        return ev

    def _record_migration(self, rep: m.MigrationReport) -> None:
        rec = {"device": rep.device, "from": rep.source, "to": rep.target, "round": rep.round, "step": rep.step,
               "mode": rep.mode, "pause_ms": round(rep.pause_ms, 3), "state_bytes": rep.state_bytes,
               "transfer_ms": round(rep.transfer_ms, 3)}
        self.results.add_migration(rec)
        self.events.emit("migration", **rec)
        self.say(migration_line(rec))

    # -- the run -------------------------------------------------------------------------

    def run(self) -> int:
        c = self.cfg.central
        listener = transport.Listener(c.listen_host, c.port, key=self.key, handler=self._serve_edge, name="central",
                                      on_reject=lambda p, e: self.events.emit("refused", peer=p, detail=str(e))).start()
        self.events.emit("listening", host=c.listen_host, port=c.port, run=self.run_name)
        weights = build_model(self.cfg.model["name"], seed=self.cfg.run["seed"]).state_dict()
        status = "finished"
        try:
            self._wait_for_testbed()
            weights = self._rounds(dict(weights))
        except RunAborted as exc:
            status = "aborted"
            self.say(f"run aborted: {exc}")
            self.results.add_failure({"reason": str(exc)})
            self.events.emit("aborted", reason=str(exc))
        sha = self.results.finish(weights, status=status)
        self.events.emit("finished", status=status, final_model_sha256=sha)
        self._broadcast(m.Shutdown(reason=f"run {status}"))
        listener.close()
        self.say(final_table(self.results.summary))
        self.say(f"central: results in {self.results.run_dir}")
        return 0 if status == "finished" else 1

    def _broadcast(self, msg: m.Message) -> None:
        with self.edges_lock:
            conns = list(self.edges.values())
        for conn in conns:
            try:
                conn.send(msg)
            except TransportError:
                pass
            if isinstance(msg, m.Shutdown):
                conn.close()

    def _wait_for_testbed(self) -> None:
        deadline = time.monotonic() + self.cfg.run["startup_timeout"]
        want_edges, want_devices = set(self.cfg.edges), set(self.cfg.devices)
        self.say(f"central: waiting for {len(want_edges)} edges and {len(want_devices)} devices")
        while True:
            with self.edges_lock:
                joined = set(self.edges)
            attached = {d for ds in self.attached.values() for d in ds}
            if joined == want_edges and attached >= want_devices:
                break
            missing = sorted(want_edges - joined) + sorted(want_devices - attached)
            self._next_event(deadline, "the testbed to come up (missing: " + ", ".join(missing) + ")")
        self.events.emit("testbed_ready", edges=sorted(want_edges), devices=sorted(want_devices))

    def _rounds(self, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t = self.cfg.training
        rounds = t["rounds"]
        for r in range(1, rounds + 1):
            t0 = time.monotonic()
            self.events.emit("round_start", round=r)
            start = m.RoundStart(round=r, lr=t["lr"], momentum=t["momentum"], batch_size=t["batch_size"],
                                 local_epochs=t["local_epochs"], weights=weights)
            self._broadcast(start)
            updates = self._collect(r, t0 + self.cfg.run["round_timeout"])
            seconds = time.monotonic() - t0
            order = sorted(updates)  # the fixed order of summation
            weights = self.strategy.aggregate([(updates[d].weights, updates[d].samples) for d in order])
            model = build_model(self.cfg.model["name"], seed=0)
            model.load_state_dict(weights)
            t_eval = time.monotonic()
            acc, loss = evaluate(model, self.test_x, self.test_y)
            rec = {"round": r, "seconds": round(seconds, 4), "eval_seconds": round(time.monotonic() - t_eval, 4),
                   "test_accuracy": acc, "test_loss": loss, "samples": sum(u.samples for u in updates.values()),
                   "devices": order, "missing": sorted(set(self.cfg.devices) - set(updates))}
            self.results.add_round(rec, {d: {"samples": u.samples, "train_seconds": u.train_seconds,
                                             "steps": u.steps, "edge": u.edge} for d, u in updates.items()})
            self.events.emit("round_done", **{k: v for k, v in rec.items() if k != "devices"})
            moves = sum(1 for mv in self.results.summary["migrations"] if mv["round"] == r)
            elapsed = time.monotonic() - self.results.started
            self.say(progress_line(rec, rounds, elapsed / r * (rounds - r), moves))
        return weights

    def _collect(self, r: int, deadline: float) -> dict[str, m.DeviceUpdate]:
        updates: dict[str, m.DeviceUpdate] = {}
        want = set(self.cfg.devices)
        while set(updates) != want:
            try:
                ev = self._next_event(deadline, f"round {r} updates from {', '.join(sorted(want - set(updates)))}")
            except RunAborted as exc:
                if "timed out" not in str(exc) or not updates:
                    raise
                # Failures are data: average what arrived, record who did not.
                for dev in sorted(want - set(updates)):
                    self.results.add_failure({"round": r, "device": dev, "reason": "no update before round_timeout"})
                self.say(f"round {r}: no update from {', '.join(sorted(want - set(updates)))}; averaging the rest")
                break
            msg = ev.msg
            if not isinstance(msg, m.DeviceUpdate):
                continue
            problem = self._check_update(r, msg, updates)
            if problem:
                self.results.add_failure({"round": r, "device": msg.device, "edge": ev.edge, "reason": problem})
                self.events.emit("update_refused", device=msg.device, edge=ev.edge, reason=problem)
                continue
            updates[msg.device] = msg
        return updates

    def _check_update(self, r: int, msg: m.DeviceUpdate, have: dict[str, Any]) -> str:
        if msg.round != r:
            return f"update for round {msg.round} during round {r}"
        if msg.device not in self.cfg.devices:
            return f"unknown device {msg.device}"
        if msg.device in have:
            return f"second update from {msg.device} in round {r}"
        if set(msg.weights) != self.full_keys:
            return "weights do not match the model"
        if msg.samples <= 0:
            return "no samples"
        return ""
