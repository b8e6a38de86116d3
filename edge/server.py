"""The edge server: wires the core (``edge.core``) to the network.

    listener  -> per connection: first message says who it is
                 AttachRequest   -> a device link (DeviceAttach, DeviceMessage, DeviceLost events)
                 SessionPull/Drop/Replica, ReplicaPull, OfferNotice
                                 -> a peer edge's link (PeerMessage, PeerLost events)
    CentralLink  the central's link, rejoined after a loss (CentralUp/Down/Message events)
    Fetcher      handovers in, on worker threads (PullOutcome events)
    EdgeCore     the one thread that handles every event and owns the sessions
    Trainer      the one thread that trains steps, handed over by the core (StepDone events)

Every link has a heartbeat and a deadline (``[faults]``), so a silent peer is noticed
within ``faults.dead_after_s`` and handled as an event like any other.
"""

from __future__ import annotations

import logging
import os
import queue
import time

from common import messages as m
from common import resolver, transport
from common.config import Config
from common.door import REFUSED, Door
from common.errors import PeerSilent, TransportError
from common.events import EventLog
from common.limits import refusal_reporter
from common.link import Link
from common.bounds import device_payload_limit
from common.models import part_keys
from common.nets import net
from common.security import Credentials
from edge.central_link import CentralLink
from edge.core import EdgeCore, Models
from edge.handover import PEER_FIRST
from edge.migration import Fetcher, Replicator, buddy_of
from edge.peers import PeerLinks
from edge.ports import DeviceAttach, DeviceLost, DeviceMessage, PeerLost, PeerMessage
from edge.session import SparePart
from edge.trainer import Trainer

log = logging.getLogger("edge")

# After a Shutdown, how long the device links get to deliver it before the process exits
# (one small message; the run is over, so a lost link only delays the exit).
SHUTDOWN_FLUSH_S = 2.0


class EdgeServer:
    def __init__(self, cfg: Config, name: str, *, creds: Credentials, events: EventLog) -> None:
        self.cfg = cfg
        self.name = name
        self.creds = creds
        self.events = events
        self.faults = cfg.faults
        # how long a live peer edge may take to answer (mobility.handover_limit_s); a device
        # that gives up waiting meanwhile and attaches again is answered by the same fetch
        limit = cfg.mobility.handover_limit_s
        model, split = cfg.model_key, cfg.base_cut
        dev_keys, edge_keys = part_keys(model, split)
        models = Models(model, split, dev_keys, edge_keys, splits=cfg.splits)
        # every part is built first, around the core's inbox: what they report is an event
        # on it, handled by the core once it runs
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        submit = inbox.put
        self.spare = SparePart(model, split + 1) if cfg.mode == "fedfly" else None
        # what a device's frame may hold at most (its cuts: every one when the central chooses them)
        auto = any(cfg.split_of(d) == "auto" for d in cfg.devices)
        cuts = net(cfg.model.name).cuts if auto else sorted({split, *cfg.splits.values()})
        self.device_payload = device_payload_limit(model, cuts, cfg.training.batch_size)
        self.peers = PeerLinks(name=name, creds=creds,
                               endpoints={n: (e.host, e.port) for n, e in cfg.edges.items() if n != name},
                               heartbeat_s=self.faults.heartbeat_s, dead_after_s=self.faults.dead_after_s,
                               answer_limit_s=limit,
                               to_core=lambda link, msg: submit(PeerLost(link) if msg is None else PeerMessage(link, msg)))
        # steps train on their own thread, so the core handles handovers while one trains
        self.trainer = Trainer(submit, name=f"{name}-trainer")
        self.central = CentralLink(cfg=cfg, name=name, creds=creds, submit=submit, events=events,
                                   on_welcome=self._on_welcome)
        buddy = buddy_of(name, sorted(cfg.edges))
        checkpoint_steps = self.faults.checkpoint_steps if cfg.mode == "fedfly" and buddy else 0
        self.replicator = Replicator(name=name, buddy=buddy, peers=self.peers, events=events) \
            if checkpoint_steps and buddy else None
        fetcher = Fetcher(name=name, peers=self.peers, submit=submit, model=model, cut_of=models.cut, spare=self.spare,
                          events=events, replicator=self.replicator)
        # refusals of the listener, rate-limited: a flood of strangers writes a few lines and a count
        self._refusals = refusal_reporter(events=events, logger=log, who=name)
        # the first message says who a connection is: a device, or another edge of the testbed
        self._door = Door(where=f"edge {name}", events=events, first_within_s=2 * self.faults.dead_after_s,
                          claims=self._who, known={"edge": set(cfg.edges) - {name}}, open=self._open)
        self.core = EdgeCore(name=name, mode=cfg.mode, models=models, seed=cfg.run.seed, devices=set(cfg.devices),
                             peers=set(cfg.edges) - {name}, central=self.central, fetcher=fetcher, events=events,
                             spare=self.spare, handover_deadline_s=limit + 2 * self.faults.dead_after_s,
                             checkpoint_steps=checkpoint_steps, replicas_kept=self.faults.replicas_kept,
                             edges=sorted(cfg.edges), handover=cfg.mobility.handover,
                             cut_first=cfg.training.cut_gradient_first, trainer=self.trainer, inbox=inbox)

    def _on_welcome(self, run_name: str) -> None:
        self.events.open(os.path.join(self.cfg.run.out, run_name))

    def run(self) -> int:
        """Serve until the central says stop (0) or is lost for good (1)."""
        me = self.cfg.edges[self.name]
        try:
            listener = transport.Listener(me.listen_host, me.port, creds=self.creds, handler=self._door,
                                          on_reject=self._refusals, name=self.name,
                                          handshake_timeout=self.faults.dead_after_s).start()
        except TransportError as exc:
            log.error("%s: %s", self.name, exc)
            self.events.emit("error", detail=str(exc))
            return 1
        self.events.emit("listening", host=me.listen_host, port=me.port)
        # the names this edge dials (the central, its peers for pulls), looked up now
        resolver.warm([(self.cfg.central.host, self.cfg.central.port),
                       *((e.host, e.port) for n, e in self.cfg.edges.items() if n != self.name)])
        self.central.start()
        self.trainer.start()
        stop = self.core.run()
        self.trainer.stop()
        listener.close()
        deadline = time.monotonic() + SHUTDOWN_FLUSH_S
        for port in self.core.closing:
            wait = getattr(port, "wait_closed", None)
            if wait is not None:
                wait(max(0.0, deadline - time.monotonic()))
        self.central.close()
        if self.replicator is not None:
            self.replicator.close()
        self.peers.close()
        if stop.status:
            log.error("%s: stopping: %s", self.name, stop.reason)
        return stop.status

    # -- connections ---------------------------------------------------------------------------

    def _who(self, first: m.Message) -> tuple[str, str] | None:
        """As whom the first message of a connection acts (role, name), or None for a
        message not allowed first (refused by the door). A device attaches only as
        itself, an edge pulls only as itself (another edge of the testbed)."""
        if isinstance(first, m.AttachRequest):
            return "device", first.device
        if isinstance(first, PEER_FIRST):
            return "edge", first.target
        return None

    def _open(self, conn: transport.Connection, first: m.Message, role: str, name: str) -> Link:
        """The link of an admitted connection, its first message handed to the core;
        its writer started first, so that the core's answer (even a refusal and a close)
        goes out."""
        core = self.core
        hb, dead = self.faults.heartbeat_s, self.faults.dead_after_s
        if role == "device":
            conn.limit_payload(self.device_payload)

            def on_lost(link: Link, exc: Exception) -> None:
                silent = time.monotonic() - link.conn.last_received if isinstance(exc, PeerSilent) else 0.0
                core.submit(DeviceLost(link, name, exc, silent))

            link = Link(conn, name=f"device {name}", heartbeat_s=hb, dead_after_s=dead,
                        on_message=lambda l, msg: core.submit(DeviceMessage(l, name, msg)), on_lost=on_lost)
            link.start_writer()
            core.submit(DeviceAttach(link, first, at=time.monotonic()))
            return link

        def on_peer_message(link: Link, msg: m.Message) -> None:
            if getattr(msg, "target", name) != name:  # the link speaks for one edge only
                link.close(notice=m.ErrorNotice(kind="AuthenticationError", detail=REFUSED))
                return
            core.submit(PeerMessage(link, msg))

        link = Link(conn, name=f"edge {name}", heartbeat_s=hb, dead_after_s=dead, on_message=on_peer_message,
                    on_lost=lambda l, exc: core.submit(PeerLost(l)))
        link.start_writer()
        core.submit(PeerMessage(link, first))
        return link
