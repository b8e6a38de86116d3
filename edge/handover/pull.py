"""Pull: the destination fetches the session once the device attached to it naming the
source (``mobility.handover = "pull"``; the path every unplanned move takes, a lost link
or a silent device, whatever the policy).

Destination B (its core; the fetch on a worker,     Source A (its core)
``edge.migration.Fetcher``)
    the device attaches naming A, at round r,
    step s: PULLING, the device waits
    SessionPull(device, r, s, proofs) ----------->  proof and position checked, snapshot
                                                    taken (with the kept reply if the
                                                    device lost it): HANDING_OVER
                               <------------------  SessionSnapshot(meta, tensors, checksum)
    verify the checksum, rebuild (worker);
    install: ACTIVE, the device continues at s
    SessionInstalled(checksum) ------------------>  checksum matches: the session goes
                                                    (GONE; a pointer "moved to B" stays)
                               <------------------  SessionReleased

A keeps the session until B has proved it holds an identical copy; if B never confirms,
A's copy stays (DETACHED) and is used only if the device names A again. A refusal can
name where the session went (``moved_to``): B follows at most ``MAX_FORWARD_HOPS``. A
session that cannot be had (its edge is gone or refuses, or no outcome comes in time) is
recovered from a replica where there is one (``edge.handover.replica``), else the round
starts again here from its weights: exact either way, at the cost of the steps redone.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from common import messages as m
from edge.handover.restart import Restart
from edge.lifecycle import Event, Pulling, State
from edge.ports import Port, PullOutcome
from edge.session import EdgeSession

if TYPE_CHECKING:
    from edge.core import Entry

S, E = State, Event
# A handed-over session may have moved on again before a pull reached it; each hop names
# the next edge. More hops than edges means a loop (a bug): give up and restart the round.
MAX_FORWARD_HOPS = 8


class Pull(Restart):
    name = "pull"
    OPENS = (*Restart.OPENS, m.SessionPull)

    # -- source side -------------------------------------------------------------------------

    def leaving(self, e: "Entry", msg: m.Leaving) -> None:
        super().leaving(e, msg)
        self.link_lost(e)

    def link_lost(self, e: "Entry") -> None:
        if e.session is not None:
            # Most likely the device is moving: hash its session now, while it
            # reconnects, so that a pull only has to send it.
            e.session.prepare_snapshot()

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {**super().peer_handlers(), m.SessionPull: self.on_pull, m.SessionInstalled: self.on_installed}

    def on_pull(self, port: Port, msg: m.SessionPull) -> None:
        core = self.core
        d, r, s = msg.device, msg.round, msg.step
        if not core.proven(msg, core.attach_keys.get(d), core.name):
            core.refuse(port, d, "refused")
            return
        e = core.entries.get(d)
        state = e.state if e is not None else S.GONE
        if e is None or e.session is None or state in (S.IDLE, S.GONE, S.PULLING):
            fwd = core.forward.get(d)
            if core.delivered.get(d, 0) >= r:
                core.refuse(port, d, "refused", delivered=True)
            elif fwd is not None and fwd.round == r and fwd.target != msg.target:
                core.refuse(port, d, "refused", moved_to=fwd.target)
            else:
                core.refuse(port, d, "refused")
            if e is not None:
                core.move(e, E.PULL_REFUSED)
            core.events.emit("handover_refused", device=d, round=r, step=s, to=msg.target, state=state.value)
            return
        session = e.session
        if self.on_its_way(e, port, msg):
            return
        if session.round != r or not (session.position_matches(s) or (state is S.DELIVERING and session.step == s)):
            core.move(e, E.PULL_REFUSED)
            core.refuse(port, d, "refused")
            core.events.emit("handover_refused", device=d, round=r, step=s, to=msg.target, state=state.value,
                             have_round=session.round, have_step=session.step)
            return
        if e.port is not None:
            # The device is attaching elsewhere: the link we have is stale.
            e.port.close(drain=False)
            e.port = None
        # the kept reply goes along only when the device lost it (it names the step before)
        meta, tensors, checksum = session.snapshot(with_reply=session.step == s + 1)
        port.post(m.SessionSnapshot(device=d, round=r, step=session.step, meta=meta, checksum=checksum, state=tensors))
        core.handing_over(e, E.PULL, port, checksum, msg.target, meta, tensors, offered=False)

    def on_its_way(self, e: "Entry", port: Port, msg: m.SessionPull) -> bool:
        """Is the session asked for on its way to the asker already (then answered so)?"""
        return False

    def on_installed(self, port: Port, msg: m.SessionInstalled) -> None:
        core = self.core
        e = core.entries.get(msg.device)
        h = e.handing if e is not None else None
        if e is None or h is None or h.port is not port or h.checksum != msg.checksum:
            port.post(m.PullRefused(device=msg.device, reason="not released", moved_to="", delivered=False))
            if h is not None:
                core.move(e, E.INSTALLED_STALE)
            return
        target = h.target
        round_ = e.session.round if e.session is not None else msg.round
        if h.kept is not None:
            core.recovery.keep(msg.device, h.kept)
        core.point(msg.device, round_, target)
        core.move(e, E.INSTALLED)
        port.post(m.SessionReleased(device=msg.device))
        core.events.emit("handed_over", device=msg.device, round=msg.round, step=msg.step, to=target)

    def handover_lost(self, e: "Entry", detail: str = "") -> None:
        """The edge we handed ``e``'s session to never confirmed: ours stays (DETACHED)."""
        self.core.move(e, E.HANDOVER_FAILED)
        self.core.events.emit("handover_unconfirmed", device=e.device, **({"detail": detail} if detail else {}))

    # -- destination side --------------------------------------------------------------------

    def attached_elsewhere(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        if req.step == 0:
            return super().attached_elsewhere(e, req, source)  # the round's weights are the session
        core = self.core
        core.move(e, E.FETCH, Pulling(req, token=core.new_token(), since=core.clock()))
        if not self.awaits_offer(e, req, source):
            self.pull_again(e, source)
        return True

    def awaits_offer(self, e: "Entry", req: m.AttachRequest, source: str) -> bool:
        """Is the session on its way here already, offered by ``source`` (wait for it)?"""
        return False

    def pull_again(self, e: "Entry", source: str) -> None:
        """Fetch the session the PULLING entry's attach names from ``source`` (its deadline
        starts now; the fetch counts under the entry's current token)."""
        p = e.pulling
        assert p is not None
        req = p.request
        p.since = self.core.clock()
        self.core.fetcher.pull(device=e.device, source=source, round=req.round, step=req.step, token=p.token,
                               proofs=req.proofs)

    def session_lost_here(self, e: "Entry", req: m.AttachRequest) -> bool:
        """The device says its session is here at a step past 0, and it is not (a device
        process restarted from its disk checkpoint, or our session is gone): the buddy's
        copy at a step the device holds, if replicas are kept (True); else False."""
        if not (self.core.checkpoint_steps and req.checkpoints):
            return False
        self.core.move(e, E.FETCH, Pulling(req))
        self.failed(e, source=self.core.name, detail=f"no session of {e.device} at step {req.step} here")
        return True

    def outcome(self, ev: PullOutcome) -> None:
        core = self.core
        e = core.entries.get(ev.device)
        p = e.pulling if e is not None else None
        if e is None or p is None or p.token != ev.token:
            if ev.session is not None:
                core.events.emit("pull_stale", device=ev.device, source=ev.source)
                self.unconfirmed(ev)
            return
        req = p.request
        r, s = req.round, req.step
        if ev.replica:
            core.recovery.answered(e, ev)
            return
        if ev.session is not None and not ev.session.position_matches(s):
            # The device attached again, at another step, while this copy was on its way:
            # it is not the one that counts. Ask again where the device says it is.
            core.events.emit("pull_superseded", device=e.device, source=ev.source, round=r, step=s,
                             got_step=ev.session.step)
            self.unconfirmed(ev)
            core.begin_resume(e, req)
            return
        if ev.session is not None:
            self.install(e, ev.session, source=ev.source, state_bytes=ev.state_bytes, transfer_ms=ev.transfer_ms,
                         offered=ev.offered)
            if ev.confirm is not None:  # after the device's answer: the source's release is not on its path
                port, installed, _ = ev.confirm
                port.post(installed)
            return
        refused = ev.refused
        if refused is not None and refused.delivered:
            core.move(e, E.NO_SESSION)  # IDLE (GONE if the device is not linked)
            if e.port is not None:
                core.reply(e, action="done", round=r, how="delivered")
            return
        if refused is not None and refused.moved_to == core.name and e.session is not None and \
                e.session.round == r and e.session.position_matches(s):
            # It moved here earlier and we still hold it: the pointer led back to us.
            self.install(e, e.session, source=core.name, state_bytes=0, transfer_ms=0.0)
            return
        if refused is not None and refused.moved_to and refused.moved_to != core.name and p.hops < MAX_FORWARD_HOPS:
            p.hops += 1
            self.pull_again(e, refused.moved_to)
            return
        # The session cannot be had (its edge is gone or refuses): the round again from its
        # weights here. Exact, at the cost of the steps done.
        detail = ev.error or (refused.reason if refused is not None else "unknown")
        self.failed(e, source=ev.source, detail=detail)

    def unconfirmed(self, ev: PullOutcome) -> None:
        """An offered session that was not installed: its source is told, and keeps it."""
        if ev.confirm is not None:
            port, _, declined = ev.confirm
            port.post(declined)
            self.core.refill()

    def install(self, e: "Entry", session: EdgeSession, *, source: str, state_bytes: int, transfer_ms: float,
                offered: bool = False) -> None:
        core = self.core
        p = e.pulling
        assert p is not None
        r, s = p.request.round, p.request.step
        e.session = session
        self.installed(e)
        core.events.emit("migrated_in", device=e.device, source=source, round=r, step=s,
                         state_bytes=state_bytes, transfer_ms=transfer_ms, offered=offered)
        core.move(e, E.PULLED)  # ACTIVE (DETACHED if the device is not linked)
        if e.port is None:
            session.prepare_snapshot()
        else:
            core.reply(e, action="continue", round=r, resume_step=s, how="pulled" if source != core.name else "here",
                       state_bytes=state_bytes, transfer_ms=transfer_ms)
        if source != core.name:
            core.refill()  # after the answer, and later still (``REFILL_DELAY_S``)

    def installed(self, e: "Entry") -> None:
        """``e``'s session was installed here (before the device is answered)."""

    def failed(self, e: "Entry", *, source: str, detail: str, replica_tried: bool = False) -> None:
        """The session the PULLING entry waits for cannot be had: from a replica if one
        can be had, else the round again from its weights (or over, if it ended)."""
        core = self.core
        p = e.pulling
        assert p is not None
        req = p.request
        r, s = req.round, req.step
        if not replica_tried and core.recovery.recover(e, source=source, detail=detail):
            return
        core.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
        core.central.send(m.FaultReport(kind="handover_failed", process=core.name, peer=source, round=r, step=s,
                                        detail=detail[:200], replayed=s, recovery="restart"))
        info = core.current
        if info is None or info.round != r or not core.takes_part(e.device, r):
            core.move(e, E.NO_SESSION)  # IDLE (GONE if the device is not linked)
            if e.port is not None:
                core.reply(e, action="wait", round=r, how="round over")
            return
        core.fresh(e, info, 0)
        if e.port is not None:
            core.reply(e, action="continue", round=r, resume_step=0, how="restart")

    # -- both --------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """Deadlines of handovers: a fetch or a confirmation that never comes (a peer that
        answers heartbeats but not us) must not hold a device forever."""
        core = self.core
        limit = core.handover_deadline_s
        for e in list(core.entries.values()):
            p, h = e.pulling, e.handing
            if p is not None and p.token and now - p.since > limit:
                core.events.emit("pull_deadline", device=e.device, waited_s=round(now - p.since, 3))
                p.token = 0  # a late outcome is stale
                self.failed(e, source=p.request.source, detail=f"no outcome within {limit:g} s")
            elif h is not None and now - h.since > limit:
                self.handover_lost(e, "no confirmation in time")

    def peer_lost(self, port: Port) -> None:
        for e in list(self.core.entries.values()):
            if e.handing is not None and e.handing.port is port:
                self.handover_lost(e)
