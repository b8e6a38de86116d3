"""Message handlers under fuzz, each through the seam its own tests use (no socket).

Every harness takes well-formed messages with hostile values (``fuzzlib.hostile_message``)
as a peer would send them, and checks after each one that nothing but a typed refusal
came out and that the handler's state is still consistent. ``step(rng)`` feeds one input
and raises ``FuzzFailure`` when an invariant breaks.
"""

from __future__ import annotations

import functools
import io
import random
import tempfile

import torch

from common import messages as m
from common.errors import ProtocolError, RemoteProtocolError
from common.security import SharedKey
from scripts.fuzzlib import FuzzFailure, NAMES, hostile_message, hostile_tensor

DEVICES = ("device1", "device2")
EDGES = ("edge1", "edge2")
# The edge's core is fuzzed with VGG-5 on 8x8 images: the same layers and cuts as the
# paper's model, but sessions of about a hundredth of its weights, so that the many a
# fuzz run builds (every round, every join) cost little and the budget goes to inputs.
EDGE_MODEL = "vgg5/3x8x8/10"
EDGE_CUT = 3


class Events:
    """Records what a handler emits (the real ``EventLog`` asks psutil for every line)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.errors: list[dict] = []

    def emit(self, event: str, **fields) -> None:
        self.names.append(event)
        if event == "core_error":
            self.errors.append(fields)

    def open(self, folder: str) -> None:
        pass


@functools.lru_cache(maxsize=None)
def _model_weights(model: str = "vgg5") -> dict[str, torch.Tensor]:
    from common.models import build_model
    return dict(build_model(model, seed=1).state_dict())


@functools.lru_cache(maxsize=None)
def _spec(model: str = "vgg5") -> dict:
    from common.models import state_spec
    return state_spec(model)


def hostile_weights(rng: random.Random, keys: list[str] | None = None, model: str = "vgg5") -> dict[str, torch.Tensor]:
    """``model``'s weights (or ``keys`` of them) with a hostile edit now and then: a
    tensor of the wrong shape or dtype, NaN, a name missing or made up."""
    full = _model_weights(model)
    w = {k: full[k] for k in (keys or full)}
    r = rng.random()
    k = rng.choice(sorted(w))
    if r < 0.15:
        w[k] = hostile_tensor(rng)
    elif r < 0.25:
        w[k] = w[k].to(rng.choice([torch.float64, torch.int64, torch.float16]))
    elif r < 0.35 and w[k].is_floating_point():
        t = w[k].clone()
        t.view(-1)[0] = rng.choice([float("nan"), float("inf"), -float("inf")])
        w[k] = t
    elif r < 0.42:
        del w[k]
    elif r < 0.5:
        w[rng.choice(NAMES)] = hostile_tensor(rng)
    elif r < 0.55:
        w = {}
    return w


# -- the edge's core ------------------------------------------------------------------------

class EdgeHarness:
    """``edge.core.EdgeCore`` with fake ports (``tests/test_edge_core.py``'s seam), in a
    round with two devices attached. Invariant: ``handle`` never lets an exception out
    (it cannot: it logs them as ``core_error``), so the invariant is that no event ends in
    a ``core_error`` other than a protocol error, and every entry's state fits its data."""

    DEVICE_TYPES = ["Activations", "DeviceDone", "MigrationReport", "FaultReport", "Leaving"]
    PEER_TYPES = ["SessionPull", "SessionDrop", "SessionReplica", "ReplicaPull", "SessionInstalled", "OfferNotice",
                  "SessionOffer", "OfferSealed", "OfferDeclined", "SessionReleased", "PullRefused", "PeerHello"]
    CENTRAL_TYPES = ["RoundStart", "UpdateAck"]

    def __init__(self, rng: random.Random, *, mode: str | None = None) -> None:
        from common.models import part_keys
        from edge.core import EdgeCore, Models
        from edge.ports import CentralMessage, CentralUp
        from edge.session import EdgeSession  # noqa: F401 - imported here: torch models are slow to load

        self.mode = mode or rng.choice(["fedfly", "fedfly", "restart", "classic"])
        dev_keys, edge_keys = part_keys(EDGE_MODEL, EDGE_CUT)
        self.events = Events()
        self.central = _FakeCentral()
        self.fetcher = _FakeFetcher()
        self.core = EdgeCore(name="edge1", mode=self.mode, models=Models(EDGE_MODEL, EDGE_CUT, dev_keys, edge_keys), seed=1,
                             devices=set(DEVICES), peers={"edge2", "edge3"}, central=self.central,
                             fetcher=self.fetcher, events=self.events, checkpoint_steps=rng.choice([0, 0, 2]),
                             edges=["edge1", "edge2", "edge3"], clock=lambda: self.now)
        self.now = 0.0
        self.core.handle(CentralUp(run_name="run", mode=self.mode))
        self.round = 1
        self._central_message = CentralMessage
        self.core.handle(CentralMessage(self._round_start(1)))
        self.ports: dict[str, object] = {}
        self.peer_ports = [_outbox("edge edge2"), _outbox("edge edge3")]
        for d in DEVICES:
            self._attach(m.AttachRequest(device=d, kind="join", round=0, step=0, source="edge1", last_round=0,
                                         why="start"))
        self._check("set-up")

    def _round_start(self, r: int, weights: dict | None = None) -> m.RoundStart:
        plan = {"round": r, "lr": 0.01, "momentum": 0.9, "batch_size": 4, "local_epochs": 1,
                "participants": list(DEVICES), "algo": {"name": "fedavg", "params": {}}, "cuts": {}}
        return m.RoundStart(plan=plan, weights=_model_weights(EDGE_MODEL) if weights is None else weights)

    def _attach(self, req: m.AttachRequest) -> None:
        from edge.ports import DeviceAttach
        port = _outbox(f"device {req.device}")
        self.ports[req.device] = port
        self.core.handle(DeviceAttach(port, req, at=self.now))

    def _activations(self, rng: random.Random, device: str) -> tuple[m.Activations, bool]:
        """A batch for ``device``'s step, in the round's bounds or (about half the time)
        just out of them: a row too many, another shape or dtype, a NaN, a label; and
        whether it is in bounds."""
        from common.bounds import cut_row
        e = self.core.entries.get(device)
        step = e.session.step if e is not None and e.session is not None else 0
        row, dtype = cut_row(EDGE_MODEL, EDGE_CUT)
        n, labels, ok = rng.choice([1, 2, 4]), [0, 3, 9], True
        r = rng.random()
        if r < 0.1:
            n, ok = rng.choice([0, 5, 64]), False
        elif r < 0.2:
            row, ok = tuple(d + rng.choice([-1, 1]) if i == len(row) - 1 else d for i, d in enumerate(row)), False
        elif r < 0.3:
            dtype, ok = rng.choice([torch.float64, torch.float16, torch.bfloat16]), False
        elif r < 0.4:
            labels, ok = [rng.choice([10, -1, 2 ** 40])], False
        y = torch.tensor([rng.choice(labels) for _ in range(n)], dtype=torch.int64)
        x = torch.randn(n, *row, generator=torch.Generator().manual_seed(rng.randrange(1000))).to(dtype)
        if n and rng.random() < 0.12:
            x.view(-1)[rng.randrange(x.numel())] = rng.choice([float("nan"), float("inf"), -float("inf")])
            ok = False
        msg = m.Activations(round=self.round, step=max(0, step + rng.choice([0, 0, 0, -1, 1])), batch={"x": x, "y": y})
        return msg, ok

    def step(self, rng: random.Random) -> str:
        """One hostile event; returns its kind (for the record)."""
        from edge.ports import DeviceLost, DeviceMessage, PeerLost, PeerMessage, PullOutcome, Tick
        core = self.core
        r = rng.random()
        self.now += rng.choice([0.0, 0.1, 1.0, 40.0])
        if r < 0.22:
            device = rng.choice(DEVICES + ("device9",))
            port = self.ports.get(device) if rng.random() < 0.9 else _outbox("stale")
            kind = rng.choice(self.DEVICE_TYPES) if rng.random() < 0.9 else None
            msg = hostile_message(rng, kind)
            what = f"device {type(msg).__name__}"
            core.handle(DeviceMessage(port or _outbox("none"), device, msg))
        elif r < 0.28:  # a step that trains costs milliseconds: fewer of these
            device = rng.choice(DEVICES)
            msg, ok = self._activations(rng, device)
            what = f"device Activations ({'in' if ok else 'out of'} bounds)"
            e = core.entries.get(device)
            session, at = (e.session, e.session.step) if e is not None and e.session is not None else (None, 0)
            core.handle(DeviceMessage(self.ports.get(device) or _outbox("none"), device, msg))
            if not ok and session is not None and session.step != at:
                raise FuzzFailure(f"edge core: {device}'s session trained a batch out of bounds ({what})")
        elif r < 0.48:
            req = hostile_message(rng, "AttachRequest")
            if rng.random() < 0.7:
                req = _replace(req, device=rng.choice(DEVICES))
            what = "AttachRequest"
            self._attach(req)
        elif r < 0.68:
            kind = rng.choice(self.PEER_TYPES) if rng.random() < 0.9 else None
            msg = hostile_message(rng, kind)
            if hasattr(msg, "device") and rng.random() < 0.7:
                msg = _replace(msg, device=rng.choice(DEVICES))
            what = f"peer {type(msg).__name__}"
            core.handle(PeerMessage(rng.choice(self.peer_ports), msg))
        elif r < 0.76:
            kind = rng.choice(self.CENTRAL_TYPES) if rng.random() < 0.95 else None
            if kind == "RoundStart" and rng.random() < 0.8:
                nxt = self.round + rng.choice([0, 1, 1, 2, -1])
                msg = self._round_start(max(1, nxt), hostile_weights(rng, model=EDGE_MODEL))
            else:
                msg = hostile_message(rng, kind)
                if isinstance(msg, m.Shutdown) and rng.random() < 0.9:
                    msg = m.UpdateAck(round=self.round, device=rng.choice(DEVICES))
            what = f"central {type(msg).__name__}"
            core.handle(self._central_message(msg))
            if core.current is not None:
                self.round = core.current.round
        elif r < 0.86:
            device = rng.choice(DEVICES)
            e = core.entries.get(device)
            token = (e.pulling.token if e.pulling else 0) if e is not None and rng.random() < 0.8 else rng.randint(0, 5)
            refused = hostile_message(rng, "PullRefused") if rng.random() < 0.8 else None
            what = "PullOutcome"
            core.handle(PullOutcome(device=device, token=token, source=rng.choice(["edge2", "edge3", "edge9", ""]),
                                    refused=refused, error=rng.choice(["", "lost"]), replica=rng.random() < 0.2))
        elif r < 0.93:
            device = rng.choice(DEVICES)
            what = "DeviceLost"
            core.handle(DeviceLost(self.ports.get(device) or _outbox("none"), device, RemoteProtocolError("gone"),
                                   rng.choice([0.0, 5.0])))
        elif r < 0.96:
            what = "PeerLost"
            core.handle(PeerLost(rng.choice(self.peer_ports)))
        else:
            what = "Tick"
            core.handle(Tick())
        self._check(what)
        return what

    def _check(self, what: str) -> None:
        from edge.lifecycle import State as S
        for err in self.events.errors:
            if err.get("error") not in ("RemoteProtocolError", "TransitionError"):
                raise FuzzFailure(f"edge core: {what} ended in {err.get('error')}: {err.get('detail')}")
        self.events.errors.clear()
        for d, e in self.core.entries.items():
            if e.device != d:
                raise FuzzFailure(f"edge core: entry {d} names {e.device} after {what}")
            if e.state in (S.ACTIVE, S.DETACHED, S.HANDING_OVER) and e.session is None:
                raise FuzzFailure(f"edge core: {d} is {e.state.name} without a session after {what}")
            if e.state is S.IDLE and e.session is not None:
                raise FuzzFailure(f"edge core: {d} is IDLE with a session after {what}")
            if e.state is S.ACTIVE and e.port is None:
                raise FuzzFailure(f"edge core: {d} is ACTIVE with no link after {what}")
            if e.session is not None and e.session.step < 0:
                raise FuzzFailure(f"edge core: {d}'s session is at step {e.session.step} after {what}")


def _replace(msg: m.Message, **changes) -> m.Message:
    import dataclasses
    return dataclasses.replace(msg, **changes)


def _outbox(name: str):
    from edge.ports import Outbox
    return Outbox(name)


class _FakeCentral:
    def __init__(self) -> None:
        self.sent: list = []
        self.delivered: list = []

    def send(self, msg) -> None:
        self.sent.append(msg)

    def deliver(self, update) -> None:
        self.delivered.append(update)

    def acked(self, device, round) -> None:
        pass

    def round_started(self, round) -> None:
        pass


class _FakeFetcher:
    def __init__(self) -> None:
        self.calls = 0

    def pull(self, **kw) -> None:
        self.calls += 1

    def drop(self, **kw) -> None:
        self.calls += 1

    def pull_replica(self, **kw) -> None:
        self.calls += 1

    def replicate(self, device, round, step, meta, tensors, *, edge_key="") -> None:
        self.calls += 1

    def offer_link(self, peer: str):
        from edge.ports import Outbox
        return Outbox(f"edge {peer}")

    def take_offer(self, **kw) -> None:
        self.calls += 1


# -- the central ----------------------------------------------------------------------------

class CentralHarness:
    """``central.server.CentralServer``'s event handler (``_handle``) in round 1, fed its
    edges' messages through the registry seam (``tests/test_rounds.py``). Invariant: no
    exception, and every update it took has the model's layout, finite values and a
    sample count its device's shard can hold."""

    TYPES = ["DeviceUpdate", "DeviceUpdate", "EdgeStatus", "MigrationReport", "FaultReport", "ErrorNotice"]

    def __init__(self, rng: random.Random) -> None:
        from central.rounds import RoundTracker
        from central.server import CentralServer
        from common.config import build_config
        raw = {"run": {"round_timeout": 30.0, "startup_timeout": 10.0}, "central": {"host": "127.0.0.1", "port": 1},
               "edges": {e: {"host": "127.0.0.1", "port": 2 + i} for i, e in enumerate(EDGES)},
               "devices": {d: {"edge": "edge1", "host": "127.0.0.1", "control_port": 10 + i}
                           for i, d in enumerate(DEVICES)}}
        self.cfg = build_config(raw)
        self.registry = _FakeRegistry()
        self.shards = {"device1": 100, "device2": 50}
        test = (torch.zeros(2, 3, 32, 32), torch.zeros(2, dtype=torch.int64))
        self.srv = CentralServer(self.cfg, creds=SharedKey(b"k" * 32), events=Events(), run_name="t",
                                 run_dir=tempfile.gettempdir(), test_set=test, shard_samples=self.shards,
                                 out=io.StringIO(), registry=self.registry)
        self.srv.tracker = RoundTracker(round=1, participants=frozenset(DEVICES), shard_samples=self.shards,
                                        grace_s=5.0, started=0.0)
        self._checked: dict[str, m.DeviceUpdate] = {}
        from central.edges import EdgeJoined, EdgeLost, EdgeMessage
        self._joined, self._lost, self._message = EdgeJoined, EdgeLost, EdgeMessage

    def step(self, rng: random.Random) -> str:
        edge = rng.choice(EDGES + ("edge9",))
        r = rng.random()
        if r < 0.05:
            ev, what = self._joined(edge, rng.random() < 0.5), "EdgeJoined"
        elif r < 0.08:
            ev, what = self._lost(edge, "lost", rng.choice([0.0, 3.0])), "EdgeLost"
        else:
            kind = rng.choice(self.TYPES) if rng.random() < 0.9 else None
            if kind == "DeviceUpdate" and rng.random() < 0.7:
                msg = m.DeviceUpdate(round=rng.choice([1, 1, 1, 0, 2, 2 ** 63 - 1]),
                                     device=rng.choice(DEVICES + ("device9",)), edge=edge,
                                     samples=rng.choice([100, 50, 1, 0, 101, 10 ** 12, 2 ** 63 - 1]),
                                     steps=rng.choice([1, 0, 2 ** 63 - 1]), train_seconds=rng.choice([1.0, 0.0, 1e300]),
                                     weights=hostile_weights(rng))
            else:
                msg = hostile_message(rng, kind)
            ev, what = self._message(edge, msg), f"edge {type(msg).__name__}"
        try:
            self.srv._handle(ev)
        except Exception as exc:  # noqa: BLE001 - the invariant
            raise FuzzFailure(f"central: {what} raised {type(exc).__name__}: {exc}") from exc
        self._check(what)
        return what

    def _check(self, what: str) -> None:
        spec = _spec()
        tracker = self.srv.tracker
        for d, upd in tracker.updates.items():
            if upd is self._checked.get(d):
                continue
            self._checked[d] = upd
            w = upd.weights
            ok = (set(w) == set(spec) and all((tuple(w[k].shape), w[k].dtype) == spec[k] for k in spec)
                  and all(bool(torch.isfinite(t).all()) for t in w.values() if t.is_floating_point())
                  and 0 < upd.samples <= self.shards[d] and upd.round == tracker.round and d in tracker.participants)
            if not ok:
                raise FuzzFailure(f"central: took a bad update of {d} (after {what})")
        if len(tracker.updates) >= len(tracker.participants):
            tracker.updates.clear()  # so that the next updates are checked and taken too


class _FakeRegistry:
    def __init__(self) -> None:
        import queue
        self.queue = queue.SimpleQueue()
        self.live = set(EDGES)
        self.greeting = None
        self.sent = 0

    def send(self, edge, msg) -> bool:
        self.sent += 1
        return True

    def broadcast(self, msg) -> None:
        self.sent += 1


# -- the device -------------------------------------------------------------------------------

class DeviceHarness:
    """The device's checks of what its peers send: the control port's ``check_move`` and
    ``check_drop`` (a controller's commands), its link's reading of an ``AttachReply``
    (``device.outcomes.read_attach``) and of a round's work (``check_round_weights``).
    Invariant: a reason string or a typed outcome (``device.outcomes``), nothing else; an
    accepted command names this device and an edge of the testbed."""

    def __init__(self, rng: random.Random) -> None:
        from common.models import part_keys
        self.keys = part_keys("vgg5", 3)[0]
        self.spec = {k: _spec()[k] for k in self.keys}

    def step(self, rng: random.Random) -> str:
        from device.control import Position, check_drop, check_move
        edges = list(EDGES)
        r = rng.random()
        if r < 0.3:
            pos = Position(edge=rng.choice(edges), pending=rng.choice([None, None, "edge2"]),
                           link=rng.choice(list(m.LINK_STATES)))
            cmd = hostile_message(rng, "MoveCommand")
            if rng.random() < 0.5:
                cmd = _replace(cmd, device="device1")
            reason = check_move(pos, device="device1", edges=edges, cmd=cmd)
            _reason_ok(reason, cmd, edges, "check_move")
            return "MoveCommand"
        if r < 0.5:
            cmd = hostile_message(rng, "DropCommand")
            if rng.random() < 0.5:
                cmd = _replace(cmd, device="device1")
            reason = check_drop(device="device1", edges=edges, cmd=cmd)
            _reason_ok(reason, cmd, edges + [""], "check_drop")
            if not reason and not 0 <= cmd.seconds <= 86400:
                raise FuzzFailure(f"check_drop took {cmd.seconds} s")
            return "DropCommand"
        if r < 0.8:
            from device import outcomes
            reply = hostile_message(rng, "AttachReply")
            try:
                got = outcomes.read_attach(reply, round=rng.choice([0, 1, 2, 2 ** 63 - 1]), step=rng.choice([0, 1, 5]),
                                           in_round=rng.random() < 0.7)
            except Exception as exc:  # noqa: BLE001 - the invariant
                raise FuzzFailure(f"device link: AttachReply raised {type(exc).__name__}: {exc}") from exc
            if not isinstance(got, (outcomes.TrainFrom, outcomes.Rollback, outcomes.RoundOver)):
                raise FuzzFailure(f"device link: AttachReply read as {got!r}")
            return "AttachReply"
        from common.models import weights_problem
        weights = hostile_weights(rng, self.keys)
        try:
            problem = weights_problem(weights, self.spec)
        except Exception as exc:  # noqa: BLE001 - the invariant
            raise FuzzFailure(f"device: round weights check raised {type(exc).__name__}: {exc}") from exc
        if not problem:
            from common.models import device_part
            device_part("vgg5", 3).load_state_dict(weights) if rng.random() < 0.05 else None
        return "DeviceRound weights"


def _reason_ok(reason: object, cmd, edges: list[str], what: str) -> None:
    if not isinstance(reason, str):
        raise FuzzFailure(f"{what} returned {reason!r}")
    if not reason and (cmd.device != "device1" or cmd.to not in edges):
        raise FuzzFailure(f"{what} accepted {cmd}")


HARNESSES = {"edge": EdgeHarness, "central": CentralHarness, "device": DeviceHarness}

__all__ = ["HARNESSES", "EdgeHarness", "CentralHarness", "DeviceHarness", "ProtocolError"]
