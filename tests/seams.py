"""What the unit tests drive the edge and the device through, and the stand-ins on the
other side: the edge's core with fake ports, a fake central and a fake fetcher (no
socket, no thread: ``core.handle(event)``, then what it sent and each device's state);
the device's link with its config, against a small stand-in edge that speaks the wire
protocol over loopback."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import pytest
import torch

from common import messages as m
from common import security, transport
from common.config import Config, build_config
from common.events import EventLog
from common.models import build_model, part_keys
from common.plan import RoundPlan
from common.security import attach_proofs, edge_key
from device.control import Position
from device.link import EdgeLink
from edge.core import EdgeCore, Models
from edge.lifecycle import State
from edge.ports import CentralMessage, CentralUp, DeviceAttach, DeviceLost, DeviceMessage, Outbox

# -- the edge's core through its seam -------------------------------------------------------------

WEIGHTS = dict(build_model("vgg5", seed=1).state_dict())
DEV_KEYS, EDGE_KEYS = part_keys("vgg5", 3)


@dataclass
class FakeCentral:
    sent: list = field(default_factory=list)
    delivered: list = field(default_factory=list)
    acks: list = field(default_factory=list)

    def send(self, msg):
        self.sent.append(msg)

    def deliver(self, update):
        self.delivered.append(update)

    def acked(self, device, round):
        self.acks.append((device, round))

    def round_started(self, round):
        self.started = round

    def faults(self):
        return [x for x in self.sent if isinstance(x, m.FaultReport)]


@dataclass
class FakeFetcher:
    pulls: list = field(default_factory=list)
    drops: list = field(default_factory=list)
    replica_pulls: list = field(default_factory=list)
    replicated: list = field(default_factory=list)

    def pull(self, **kw):
        self.pulls.append(kw)

    def drop(self, **kw):
        self.drops.append(kw)

    def pull_replica(self, **kw):
        self.replica_pulls.append(kw)

    def replicate(self, device, round, step, meta, tensors, *, edge_key=""):
        self.replicated.append((device, round, step, meta, tensors))

    offers: list = field(default_factory=list)
    links: dict = field(default_factory=dict)   # peer -> the Outbox an offer goes through

    def offer_link(self, peer):
        return self.links.get(peer)

    def take_offer(self, **kw):
        self.offers.append(kw)

    prepared: list = field(default_factory=list)

    def prepare_offer(self, **kw):
        self.prepared.append(kw)
        return kw  # the handle take_offer is given


def make_core(mode: str = "fedfly", name: str = "edge1", *, welcomed: bool = True, **kw) -> EdgeCore:
    """A core, ``welcomed`` by the central (or not yet: its attaches are parked); ``kw``:
    more of ``EdgeCore``'s settings (a clock, deadlines)."""
    core = EdgeCore(name=name, mode=mode, models=Models("vgg5", 3, DEV_KEYS, EDGE_KEYS), seed=1,
                    devices={"device1", "device2"}, peers={"edge1", "edge2"} - {name}, central=FakeCentral(),
                    fetcher=FakeFetcher(), events=EventLog(process=name, role="edge"), **kw)
    if welcomed:
        core.handle(CentralUp(run_name="run", mode=mode))
    return core


def start_round(core: EdgeCore, r: int = 1, participants=("device1", "device2")) -> None:
    plan = RoundPlan(round=r, lr=0.01, momentum=0.9, batch_size=4, local_epochs=1, participants=participants)
    core.handle(CentralMessage(m.RoundStart(plan=plan.to_wire(), weights=WEIGHTS)))


SECRET = bytes(range(32))  # the devices' secret for their proofs of attachment
EDGES = ["edge1", "edge2", "edge3"]


def proofs(device: str, target: str) -> dict[str, str]:
    """What the edge ``target`` forwards when ``device`` attached to it."""
    return attach_proofs(SECRET, device=device, target=target, edges=EDGES)


def attach(core: EdgeCore, device="device1", *, kind="join", round=0, step=0, source="edge1", last_round=0,
           why="start") -> Outbox:
    port = Outbox(f"device {device}")
    core.handle(DeviceAttach(port, m.AttachRequest(device=device, kind=kind, round=round, step=step, source=source,
                                                   last_round=last_round, why=why,
                                                   edge_key=edge_key(SECRET, core.name),
                                                   proofs=attach_proofs(SECRET, device=device, target=core.name,
                                                                        edges=EDGES))))
    return port


def batch(step: int) -> m.Activations:
    g = torch.Generator().manual_seed(step)
    return m.Activations(round=1, step=step, batch={"x": torch.randn(4, 64, 8, 8, generator=g),
                                                    "y": torch.randint(0, 10, (4,), generator=g)})


def of(port: Outbox, kind):
    return [x for x in port.sent if isinstance(x, kind)]


def state(core: EdgeCore, device="device1") -> State:
    e = core.entries.get(device)
    return e.state if e is not None else State.GONE


def active(core: EdgeCore, steps: int = 1) -> Outbox:
    """device1 attached, round 1 started, its steps 0 .. ``steps`` - 1 sent; its port."""
    p = attach(core)
    start_round(core)
    for s in range(steps):
        core.handle(DeviceMessage(p, "device1", batch(s)))
    return p


def detached_session(core: EdgeCore) -> Outbox:
    """device1's session two steps in, its link lost."""
    p = active(core, 2)
    core.handle(DeviceLost(p, "device1", ConnectionError("left"), 0.0))
    return p


@dataclass
class HeldTrainer:
    """The trainer's seam: keeps the steps handed to it; the test trains them (``finish``)."""
    jobs: list = field(default_factory=list)

    def submit(self, job):
        self.jobs.append(job)

    def finish(self, core: EdgeCore) -> None:
        core.handle(self.jobs.pop(0).run())


# -- the device's link ---------------------------------------------------------------------------

KEY = bytes(range(32))  # the testbed key of the device and of the stand-in edges


def device_config(ports=(2, 3, 4), *, on: str = "edge2", **sections) -> Config:
    """device1 on ``on``; edges 1-3 on loopback at ``ports``; ``sections``: the rest of
    the config (``faults``, ``run``...)."""
    return build_config({"central": {"host": "127.0.0.1", "port": 1},
                         "edges": {f"edge{i + 1}": {"host": "127.0.0.1", "port": p} for i, p in enumerate(ports)},
                         "devices": {"device1": {"edge": on, "host": "127.0.0.1", "control_port": 9}},
                         **sections})


def device_link(cfg: Config, events) -> EdgeLink:
    """device1's link, linked to nothing yet, on its config's edge."""
    return EdgeLink(cfg=cfg, name="device1", creds=security.SharedKey(KEY), events=events,
                    pos=Position(edge=cfg.devices["device1"].edge))


class Events:
    """What the link puts on the record."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict]] = []

    def emit(self, event: str, **fields) -> None:
        self.seen.append((event, fields))

    def open(self, folder: str) -> None:
        pass

    def named(self, event: str) -> list[dict]:
        return [f for e, f in self.seen if e == event]


class StandInEdge:
    """A listener that speaks the wire protocol as an edge: ``answer(request)`` is its
    AttachReply to each attach, ``on(msg)`` the messages it sends back for anything else."""

    def __init__(self, answer, on=lambda msg: []) -> None:
        self.answer, self.on = answer, on
        self.got: list[m.Message] = []
        self._stop = threading.Event()
        self.listener = transport.Listener("127.0.0.1", 0, creds=security.SharedKey(KEY), handler=self._serve,
                                           name="stand-in edge").start()
        self.port = self.listener.port

    def _serve(self, conn: transport.Connection) -> None:
        while not self._stop.is_set():
            try:
                msg = conn.recv(timeout=0.2)
            except TimeoutError:
                continue
            except Exception:  # noqa: BLE001 - the device left
                return
            self.got.append(msg)
            for out in [self.answer(msg)] if isinstance(msg, m.AttachRequest) else self.on(msg):
                conn.send(out)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


def accept(req: m.AttachRequest, *, resume_step: int | None = None, how: str = "here") -> m.AttachReply:
    """An edge's yes: go on at the device's step (or at ``resume_step``)."""
    return m.AttachReply(ok=True, reason="", run_name="", mode="fedfly", action="continue", round=req.round,
                         resume_step=req.step if resume_step is None else resume_step, how=how, state_bytes=0,
                         transfer_ms=0.0)


@pytest.fixture
def edges():
    made: list[StandInEdge] = []

    def make(*args, **kw) -> StandInEdge:
        made.append(StandInEdge(*args, **kw))
        return made[-1]
    yield make
    for e in made:
        e.close()


def make_link(tmp_path, ports, *, on="edge2", preconnect=False, give_up_s=30.0, startup_s=30.0):
    """device1 linked to nothing yet, on ``on``; edges 1-3 at ``ports``."""
    cfg = device_config(ports, on=on, run={"out": str(tmp_path), "startup_timeout": startup_s},
                        mobility={"preconnect": preconnect},
                        faults={"reconnect": "same", "heartbeat_s": 0.1, "dead_after_s": 5.0, "give_up_s": give_up_s})
    events = Events()
    return device_link(cfg, events), events
