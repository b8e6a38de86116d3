"""Relay: the session stays on the edge where the round began; the edge a device moves
to forwards its steps (and its round's end) there over the backhaul, and the replies
back (``mobility.handover = "relay"``). Nothing is copied at the move; every later step
pays the backhaul twice. The classic alternative to migration in mobile edge computing:
the service stays put.

Relaying edge B (its core)                          Holder A (its core)
    the device attaches naming A, at round r,
    step s > 0: PULLING, the device waits
    RelayOpen(device, r, s, proofs) ------------->  proof and position checked (as a pull);
                                                    the link to B becomes the device's
                                                    port (``RelayPort``): ACTIVE
                               <------------------  RelayAnswer(opened)
    IDLE here (linked, no session), a pointer
    "it is on A"; the device continues at s
    device: Activations -> RelayStep ------------>  trained as the device's own step
                               <------------------  RelayGradients -> device: Gradients
    device: DeviceDone -> RelayDone ------------->  delivered to the central as usual
                               <------------------  RelayDoneAck -> device: DoneAck; the
                                                    relay ends with the round

Exact: the one session trains every step, in order, as if the device had not moved.
When the holder is gone or refuses: a refusal that names where the session went is
followed; any other refusal or a lost link falls back to a pull (``edge.handover.pull``),
which recovers from a replica if there is one and otherwise starts the round again here
from its weights (exact, at the cost of the steps done). No answer in time (the pull's
deadline, ``Pull.tick``) goes straight to the replica or the round again.
A relay link lost after it opened closes the device's link here; the device attaches
again and the same steps follow (a new relay, or the pull when the holder is gone).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from common import messages as m
from common.errors import ConnectionClosed
from edge.handover.pull import MAX_FORWARD_HOPS, Pull
from edge.lifecycle import Event, State
from edge.ports import DeviceLost, DeviceMessage, Port, PullOutcome

if TYPE_CHECKING:
    from edge.core import Entry

S, E = State, Event


class RelayPort:
    """The holder's port for a device served over a relaying edge's link: what the core
    sends the device goes to that edge, wrapped; anything a relay does not carry (a new
    round's work, a stand-by) ends the relay as a lost link would."""

    def __init__(self, link: Port, device: str, round: int, lost: Callable[["RelayPort"], None]) -> None:
        self.link, self.device, self.round = link, device, round
        self.name = f"device {device} (relayed by {link.name})"
        self.closed = False
        self._lost = lost

    def post(self, msg: m.Message) -> bool:
        if self.closed:
            return False
        if isinstance(msg, m.Gradients):
            return self.link.post(m.RelayGradients(device=self.device, round=msg.round, step=msg.step, loss=msg.loss,
                                                   grad=msg.grad))
        if isinstance(msg, m.DoneAck):
            sent = self.link.post(m.RelayDoneAck(device=self.device, round=msg.round))
            self.close()  # the round's end is the relay's end
            return sent
        self.close()
        return False

    def close(self, notice: m.Message | None = None, *, drain: bool = True) -> None:
        if not self.closed:
            self.closed = True
            self._lost(self)


@dataclass
class Relayed:
    """A device this edge relays for (or asked to): its session is on ``holder``."""
    link: Port
    holder: str
    round: int
    open: bool = False


class Relay(Pull):
    name = "relay"
    OPENS = (*Pull.OPENS, m.RelayOpen)
    UNASKED = (*Pull.UNASKED, m.RelayAnswer, m.RelayGradients, m.RelayDoneAck)  # the holder's side of a relay

    def __init__(self, core) -> None:
        super().__init__(core)
        self.relays: dict[str, Relayed] = {}   # relaying side: device -> where its session is
        self.pull_only: dict[str, int] = {}     # device -> the fetch (token) that pulls instead
        self.serving: dict[str, str] = {}       # holder side: device -> the edge that relays for it

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {**super().peer_handlers(), m.RelayOpen: self.on_open, m.RelayStep: self.on_step,
                m.RelayDone: self.on_done, m.RelayAnswer: self.on_answer, m.RelayGradients: self.on_gradients,
                m.RelayDoneAck: self.on_done_ack}

    # -- the holder's side -------------------------------------------------------------------

    def link_lost(self, e: "Entry") -> None:
        """Nothing to prepare: the session is served where it is (a pull, should one come,
        takes its snapshot then)."""

    def on_open(self, port: Port, msg: m.RelayOpen) -> None:
        core = self.core
        d, r, s = msg.device, msg.round, msg.step

        def refuse(moved_to: str = "", delivered: bool = False) -> None:
            port.post(m.RelayAnswer(device=d, round=r, step=s, opened=False, moved_to=moved_to, delivered=delivered))
            core.events.emit("relay_refused", device=d, round=r, step=s, to=msg.target)

        if not core.proven(msg, core.attach_keys.get(d), core.name):
            refuse()
            return
        e = core.entries.get(d)
        session = e.session if e is not None else None
        if e is None or session is None or e.state in (S.IDLE, S.GONE, S.PULLING):
            fwd = core.forward.get(d)
            if core.delivered.get(d, 0) >= r:
                refuse(delivered=True)
            elif fwd is not None and fwd.round == r and fwd.target != msg.target:
                refuse(moved_to=fwd.target)
            else:
                refuse()
            return
        if session.round != r or not (session.position_matches(s) or (e.state is S.DELIVERING and session.step == s)):
            refuse()
            return
        if e.port is not None:
            e.port.close(drain=False)  # the device's old link here (or an older relay) is stale
        e.port = RelayPort(port, d, r, lost=self._relay_port_lost)
        self.serving[d] = msg.target
        core.move(e, E.ATTACH if e.state is S.DELIVERING else E.RESUME)
        port.post(m.RelayAnswer(device=d, round=r, step=s, opened=True, moved_to="", delivered=False))
        core.events.emit("relay_serving", device=d, round=r, step=s, via=msg.target)

    def _relayed_port(self, port: Port, device: str) -> RelayPort | None:
        e = self.core.entries.get(device)
        if e is not None and isinstance(e.port, RelayPort) and e.port.link is port and not e.port.closed:
            return e.port
        return None

    def on_step(self, port: Port, msg: m.RelayStep) -> None:
        relay = self._relayed_port(port, msg.device)
        if relay is not None:  # else: a relay that ended (the device is served elsewhere now)
            self.core.handle(DeviceMessage(relay, msg.device, m.Activations(round=msg.round, step=msg.step,
                                                                            batch=msg.batch)))

    def on_done(self, port: Port, msg: m.RelayDone) -> None:
        relay = self._relayed_port(port, msg.device)
        if relay is not None:
            self.core.handle(DeviceMessage(relay, msg.device, m.DeviceDone(
                round=msg.round, samples=msg.samples, steps=msg.steps, train_seconds=msg.train_seconds,
                weights=msg.weights)))

    def _relay_port_lost(self, relay: RelayPort) -> None:
        # as a device link's end: through the queue, after what the core handles now
        self.core.submit(DeviceLost(relay, relay.device, ConnectionClosed(f"relay over {relay.link.name} ended")))

    # -- the relaying side -------------------------------------------------------------------

    def attached_elsewhere(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        """A device that comes back to the holder naming the edge that relayed for it finds
        its session here; any other goes PULLING as for a pull (its token and deadline),
        and its fetch is a relay (``pull_again``)."""
        core = self.core
        session = e.session
        if self.serving.get(e.device) == source and session is not None and session.round == req.round \
                and session.position_matches(req.step) and e.state in (S.ACTIVE, S.DETACHED):
            del self.serving[e.device]
            core.move(e, E.RESUME)
            core.reply(e, action="continue", round=req.round, resume_step=req.step, how="here")
            return True
        return super().attached_elsewhere(e, req, source)

    def pull_again(self, e: "Entry", source: str) -> None:
        """Ask ``source`` to serve the session through us; a pull where we cannot (no link
        kept to it now, or this fetch fell back to a pull already)."""
        core = self.core
        p = e.pulling
        assert p is not None
        req = p.request
        link = core.fetcher.offer_link(source)
        if link is None or self.pull_only.get(e.device) == p.token:
            self.relays.pop(e.device, None)
            core.events.emit("relay_fallback", device=e.device, source=source, round=req.round, step=req.step,
                             to="pull", why="no link kept" if link is None else "relay failed")
            super().pull_again(e, source)
            return
        p.since = core.clock()
        self.relays[e.device] = Relayed(link, source, req.round)
        link.post(m.RelayOpen(device=e.device, round=req.round, step=req.step, target=core.name, proofs=req.proofs))

    def on_answer(self, port: Port, msg: m.RelayAnswer) -> None:
        core = self.core
        e = core.entries.get(msg.device)
        relay = self.relays.get(msg.device)
        p = e.pulling if e is not None else None
        if e is None or p is None or relay is None or relay.link is not port or relay.open:
            return  # an answer that no longer counts (the holder's relay port ends with its link)
        req = p.request
        if (req.round, req.step) != (msg.round, msg.step):
            # the device attached again, at another step, while this was on its way: ask
            # again where the device says it is (an opened relay ends with its link's use)
            del self.relays[msg.device]
            core.begin_resume(e, req)
            return
        if not msg.opened:
            del self.relays[msg.device]
            if msg.delivered:
                core.move(e, E.NO_SESSION)  # IDLE (GONE if the device is not linked)
                if e.port is not None:
                    core.reply(e, action="done", round=req.round, how="delivered")
            elif msg.moved_to and msg.moved_to != core.name and p.hops < MAX_FORWARD_HOPS:
                p.hops += 1
                self.pull_again(e, msg.moved_to)
            else:
                self.pull_only[e.device] = p.token  # this fetch pulls from now on
                self.pull_again(e, relay.holder)
            return
        relay.open = True
        core.point(e.device, req.round, relay.holder)  # a pull of it here is sent on to the holder
        core.move(e, E.NO_SESSION)  # no session here: IDLE (GONE if the device is not linked)
        core.events.emit("relaying", device=e.device, round=req.round, step=req.step, holder=relay.holder)
        if e.port is None:
            del self.relays[e.device]
            return
        core.reply(e, action="continue", round=req.round, resume_step=req.step, how="relayed")

    def device_message(self, ev: DeviceMessage) -> bool:
        relay = self.relays.get(ev.device)
        e = self.core.entries.get(ev.device)
        if relay is None or not relay.open or e is None or e.port is not ev.port:
            return False
        msg = ev.msg
        if isinstance(msg, m.Activations):
            relay.link.post(m.RelayStep(device=ev.device, round=msg.round, step=msg.step, batch=msg.batch))
        elif isinstance(msg, m.DeviceDone):
            relay.link.post(m.RelayDone(device=ev.device, round=msg.round, samples=msg.samples, steps=msg.steps,
                                        train_seconds=msg.train_seconds, weights=msg.weights))
        else:
            return False  # reports, a leaving: the core's
        return True

    def on_gradients(self, port: Port, msg: m.RelayGradients) -> None:
        relay = self.relays.get(msg.device)
        e = self.core.entries.get(msg.device)
        if relay is not None and relay.link is port and e is not None and e.port is not None:
            e.port.post(m.Gradients(round=msg.round, step=msg.step, loss=msg.loss, grad=msg.grad))

    def on_done_ack(self, port: Port, msg: m.RelayDoneAck) -> None:
        relay = self.relays.get(msg.device)
        if relay is None or relay.link is not port:
            return
        del self.relays[msg.device]
        e = self.core.entries.get(msg.device)
        if e is not None and e.port is not None:
            e.port.post(m.DoneAck(round=msg.round))

    # -- both --------------------------------------------------------------------------------

    def outcome(self, ev: PullOutcome) -> None:
        relay = self.relays.get(ev.device)
        if relay is not None and not relay.open:
            del self.relays[ev.device]  # it was pulled instead
        super().outcome(ev)

    def round_start(self, r: int) -> None:
        super().round_start(r)
        core = self.core
        self.relays = {d: x for d, x in self.relays.items() if x.round >= r}
        self.serving.clear()  # relays end with their round
        for e in core.entries.values():
            if isinstance(e.port, RelayPort) and e.port.round < r:
                e.port.closed = True  # the relay ends with its round (its link goes on)
                e.port = None  # (the core's round start then lets the entry go: it is not linked)
        for peer in sorted(core.peers):
            core.fetcher.offer_link(peer)  # links to relay on, opened now (in the background)

    def peer_lost(self, port: Port) -> None:
        core = self.core
        for e in list(core.entries.values()):
            if isinstance(e.port, RelayPort) and e.port.link is port:
                e.port.close()  # holder: as the device's link lost
        for d, relay in list(self.relays.items()):
            if relay.link is not port:
                continue
            del self.relays[d]
            e = core.entries.get(d)
            if e is None:
                continue
            if e.pulling is not None:
                self.pull_only[d] = e.pulling.token
                self.pull_again(e, relay.holder)  # no answer will come: pull it
            elif e.port is not None:
                # the holder is gone mid-relay: the device attaches again, and finds its
                # session (a pull from the holder fails: a replica, or the round again)
                e.port.close(notice=m.ErrorNotice(kind="ConnectionClosed", detail="the relayed edge was lost"))
        super().peer_lost(port)
