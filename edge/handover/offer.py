"""Offer: the source pushes the session when the device leaves for a planned move
(``mobility.handover = "offer"``, the default), so its bytes travel while the device
connects to the destination. Everything that is not a planned move (a lost link, a
silent device, an offer that fails) is pulled (``edge.handover.pull``).

Source A (its core)                                 Destination B (its core; rebuild on a
                                                    worker, ``Fetcher.prepare_offer``)
    the device says Leaving(to=B, round, step)
    OfferNotice(device, round, step) ------------>  kept as an ``Offer`` (a device that
                                                    attaches naming A there waits for it)
    SessionOffer(meta, tensors) ----------------->
    OfferSealed(checksum) ----------------------->  verified and rebuilt now, before the
    HANDING_OVER                                    device comes
                                                    the device attaches naming A at that
                                                    position: installed, ACTIVE
                               <------------------  SessionInstalled(checksum)
    checksum matches: GONE
    SessionReleased ----------------------------->  (for the record)

Either side may give up: B declines (``OfferDeclined``: the device went elsewhere, came
at another position, never came, or the copy failed its checks) and A keeps the session
for a pull. A pull that reaches A while the offer to that puller is on its way is told
so (``PullRefused.offered``) and waits for the offer instead of a second copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from common import messages as m
from edge.handover.pull import MAX_FORWARD_HOPS, Pull
from edge.lifecycle import Event
from edge.ports import Port, PullOutcome

if TYPE_CHECKING:
    from edge.core import Entry

E = Event


@dataclass
class Offer:
    """A session another edge offered us when its device left for here (``OfferNotice``,
    then its ``SessionOffer``): used if the device attaches naming that edge at that
    position, declined otherwise."""
    port: Port
    source: str
    round: int
    step: int
    at: float
    body: m.SessionOffer | None = None
    checksum: str = ""  # from its ``OfferSealed``
    token: int = 0   # the pull of the entry that waits for it (0: none waits yet)
    built: object = None  # ``Fetcher.prepare_offer``'s handle: verified and rebuilt from the seal on

    @property
    def ready(self) -> bool:
        return self.body is not None and bool(self.checksum)

    def matches(self, source: str, round: int, step: int) -> bool:
        """Is this the session a device that names ``source`` at ``round``/``step`` needs?"""
        return (self.source, self.round, self.step) == (source, round, step)


class OfferPolicy(Pull):
    name = "offer"
    OPENS = (*Pull.OPENS, m.OfferNotice)
    UNASKED = (*Pull.UNASKED, m.SessionInstalled, m.OfferDeclined)  # answers to our offers

    def __init__(self, core) -> None:
        super().__init__(core)
        self.offers: dict[str, Offer] = {}     # device -> the session its last edge offered us

    # -- source side -------------------------------------------------------------------------

    def leaving(self, e: "Entry", msg: m.Leaving) -> None:
        """The device stops here at ``msg.step`` for a planned move to ``msg.to``: its
        session goes to ``msg.to`` now, while the device connects there (the destination
        waits for it instead of pulling). Not offered (no kept link to that edge yet,
        another position): held as for a lost link, and pulled."""
        core = self.core
        session = e.session
        link = None
        if session is not None and msg.to in core.peers and session.round == msg.round \
                and session.position_matches(msg.step):
            link = core.fetcher.offer_link(msg.to)
        if link is None or session is None:
            super().leaving(e, msg)
            return
        core.events.emit("left", device=e.device, round=msg.round, step=msg.step, to=msg.to, offered=True)
        port, e.port = e.port, None
        assert port is not None
        d, r = e.device, msg.round
        link.post(m.OfferNotice(device=d, round=r, step=msg.step, target=core.name))
        meta, tensors, digest = session.start_snapshot(with_reply=session.step == msg.step + 1)
        # the bytes go now; the checksum, computed meanwhile on the hashing threads, after them
        sent = link.post(m.SessionOffer(device=d, round=r, step=msg.step, target=core.name, meta=meta, state=tensors))
        checksum = digest()
        port.close(drain=False)
        if not (sent and link.post(m.OfferSealed(device=d, round=r, step=msg.step, target=core.name,
                                                 checksum=checksum))):
            core.move(e, E.LEAVE)
            return
        core.handing_over(e, E.LEAVE_OFFERED, link, checksum, msg.to, meta, tensors, offered=True)

    def on_its_way(self, e: "Entry", port: Port, msg: m.SessionPull) -> bool:
        session, h = e.session, e.handing
        if h is not None and h.offered and h.target == msg.target \
                and session is not None and session.round == msg.round and session.position_matches(msg.step):
            # offered to that edge when the device left, and on its way there already: the
            # puller waits for that copy rather than have a second one sent
            self.core.move(e, E.PULL_REFUSED)
            self.core.refuse(port, msg.device, "refused", offered=True)
            self.core.events.emit("pull_answered_by_offer", device=msg.device, round=msg.round, step=msg.step,
                                  to=msg.target)
            return True
        return False

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {**super().peer_handlers(), m.OfferNotice: self.on_notice, m.SessionOffer: self.on_offer,
                m.OfferSealed: self.on_sealed, m.OfferDeclined: self.on_declined,
                m.SessionReleased: self.on_answered, m.PullRefused: self.on_answered}

    def on_declined(self, port: Port, msg: m.OfferDeclined) -> None:
        e = self.core.entries.get(msg.device)
        if e is None or e.handing is None or e.handing.port is not port:
            return  # an answer to an offer that no longer counts
        self.core.move(e, E.HANDOVER_FAILED)
        self.core.events.emit("offer_declined", device=msg.device, round=msg.round, step=msg.step, by=port.name)
        if e.session is not None:
            e.session.prepare_snapshot()

    def on_answered(self, port: Port, msg: m.SessionReleased | m.PullRefused) -> None:
        """The source's answer to an offered session we confirmed: for the record."""
        self.core.events.emit("handover_confirmed" if isinstance(msg, m.SessionReleased) else "handover_unconfirmed",
                              device=msg.device, source=port.name, offered=True)

    # -- destination side --------------------------------------------------------------------

    def on_notice(self, port: Port, msg: m.OfferNotice) -> None:
        core = self.core
        d = msg.device
        if self.offers.get(d) is not None:
            self.decline(d)  # a newer offer replaces it
        if d not in core.known_devices or core.mode != "fedfly" or (
                core.current is not None and msg.round < core.current.round):
            port.post(m.OfferDeclined(device=d, round=msg.round, step=msg.step))
            return
        o = self.offers[d] = Offer(port, msg.target, msg.round, msg.step, at=core.clock())
        e = core.entries.get(d)
        p = e.pulling if e is not None else None
        if p is not None and p.offer_token and p.offer_token == p.token and \
                o.matches(p.request.source, p.request.round, p.request.step):
            o.token = p.token  # its pull was told to wait for this

    def on_offer(self, port: Port, msg: m.SessionOffer) -> None:
        o = self.offers.get(msg.device)
        if o is None or o.port is not port or (o.round, o.step) != (msg.round, msg.step) or o.body is not None:
            port.post(m.OfferDeclined(device=msg.device, round=msg.round, step=msg.step))
            return
        o.body = msg

    def on_sealed(self, port: Port, msg: m.OfferSealed) -> None:
        o = self.offers.get(msg.device)
        if o is None or o.port is not port or (o.round, o.step) != (msg.round, msg.step) or o.body is None \
                or o.checksum:
            port.post(m.OfferDeclined(device=msg.device, round=msg.round, step=msg.step))
            return
        o.checksum = msg.checksum
        if self.core.current is not None and self.core.current.round >= o.round:
            # verified and rebuilt now, off this thread, whether or not its device is here
            # yet (not before its round started here: the round's cuts are not known)
            o.built = self.prepare(msg.device, o)
        e = self.core.entries.get(msg.device)
        if e is not None and self.waits_on(e, o):
            self.take(e, o)

    def awaits_offer(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        o = self.offers.get(e.device)
        if o is not None and o.matches(source, req.round, req.step):
            # it left there for here: its session is on its way (or here) already
            assert e.pulling is not None
            o.token = e.pulling.token
            self.core.events.emit("offer_awaited", device=e.device, source=source, round=o.round, step=o.step,
                                  arrived=o.ready)
            if o.ready:
                self.take(e, o)
            return True
        if o is not None:
            self.decline(e.device)
        return False

    def outcome(self, ev: PullOutcome) -> None:
        e = self.core.entries.get(ev.device)
        p = e.pulling if e is not None else None
        if e is None or p is None or p.token != ev.token:
            super().outcome(ev)
            return
        r, s = p.request.round, p.request.step
        refused = ev.refused
        if ev.offered and ev.session is None:
            # the offered copy failed its checks (the source was told): pull it instead
            self.core.events.emit("offer_failed", device=e.device, source=ev.source, detail=ev.error[:200])
            p.no_offer = p.token
            self.pull_again(e, ev.source)
        elif refused is not None and refused.offered and not ev.replica and p.no_offer == p.token:
            if p.hops < MAX_FORWARD_HOPS:
                # the offer failed here, and the source has not heard it yet (the news is
                # on the other link): ask again
                p.hops += 1
                self.pull_again(e, ev.source)
            else:
                self.failed(e, source=ev.source, detail=ev.error or refused.reason)
        elif refused is not None and refused.offered and not ev.replica:
            # its source offered it to us when the device left: that copy is on its way
            o = self.offers.get(e.device)
            if o is not None and o.matches(ev.source, r, s):
                o.token = p.token
                if o.ready:
                    self.take(e, o)
            else:
                p.offer_token = p.token  # its notice is still on its way
            self.core.events.emit("offer_awaited", device=e.device, source=ev.source, round=r, step=s,
                                  arrived=o is not None and o.ready, after_pull=True)
        else:
            super().outcome(ev)

    def installed(self, e: "Entry") -> None:
        if e.device in self.offers:
            self.decline(e.device, why="pulled meanwhile")  # it came the other way first

    def prepare(self, device: str, o: Offer) -> object:
        assert o.body is not None
        return self.core.fetcher.prepare_offer(device=device, source=o.source, offer=o.body, checksum=o.checksum)

    def take(self, e: "Entry", o: Offer) -> None:
        assert o.body is not None
        assert e.pulling is not None
        del self.offers[e.device]
        if o.built is None:
            o.built = self.prepare(e.device, o)
        self.core.fetcher.take_offer(device=e.device, source=o.source, token=e.pulling.token, offer=o.body,
                                     checksum=o.checksum, port=o.port, since=o.at, prepared=o.built)

    def decline(self, device: str, *, why: str = "declined") -> None:
        """Forget the offer for ``device`` and tell its source (which keeps the session for
        a pull). An entry that waited for it pulls instead."""
        o = self.offers.pop(device)
        o.port.post(m.OfferDeclined(device=device, round=o.round, step=o.step))
        self.lost(device, o, why)

    def lost(self, device: str, o: Offer, why: str) -> None:
        self.core.events.emit("offer_dropped", device=device, source=o.source, round=o.round, step=o.step, why=why)
        if o.built is not None:
            # its rebuild took the spare part; if it has not taken it yet, this refill does
            # nothing and the next install builds its own part (rare; a refill started at the
            # end of every rebuild would instead compete with the install that follows)
            self.core.refill()
        e = self.core.entries.get(device)
        if e is not None and self.waits_on(e, o):
            assert e.pulling is not None
            e.pulling.offer_token = 0
            e.pulling.no_offer = e.pulling.token
            self.pull_again(e, o.source)

    @staticmethod
    def waits_on(e: "Entry", o: Offer) -> bool:
        """Is ``e``'s current fetch waiting for offer ``o``?"""
        return bool(o.token) and e.pulling is not None and e.pulling.token == o.token

    # -- both --------------------------------------------------------------------------------

    def round_start(self, r: int) -> None:
        super().round_start(r)
        for d, o in list(self.offers.items()):
            if o.round < r:
                self.decline(d)
        for peer in sorted(self.core.peers):
            self.core.fetcher.offer_link(peer)  # links to offer sessions on, opened now (in the background)

    def tick(self, now: float) -> None:
        super().tick(now)
        for d, o in list(self.offers.items()):
            e = self.core.entries.get(d)
            waited_on = e is not None and self.waits_on(e, o)
            if (o.token and not waited_on) or (not o.token and now - o.at > self.core.handover_deadline_s):
                self.decline(d)  # its device went elsewhere, or never came

    def peer_lost(self, port: Port) -> None:
        for d, o in list(self.offers.items()):
            if o.port is port:
                del self.offers[d]
                self.lost(d, o, "link lost")
        for e in list(self.core.entries.values()):
            p = e.pulling
            if p is not None and p.offer_token and p.offer_token == p.token \
                    and e.device not in self.offers and port.name == f"edge {p.request.source}":
                # the offer it was told to wait for may have been on that link: ask again
                p.offer_token = 0
                self.pull_again(e, p.request.source)
        super().peer_lost(port)
