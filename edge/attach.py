"""What a device's ``AttachRequest`` becomes on this edge, and the reply it gets.

The core (``edge.core``) hands each attach here, on its own thread. The decision is one
event of the lifecycle table (``edge.lifecycle``), taken through ``EdgeCore.move``:

    NO_SESSION   no work for it here now: wait, or "done" (its update was delivered)
    FRESH        its round from the round's weights (a join, a restart, no state to fetch)
    RESUME       its session is here (a link that came back): it goes on
    FETCH        its round is not known here yet; a session on another edge is the
                 handover policy's to fetch (``attached_elsewhere``)
    ATTACH       a fetch or a delivery goes on, and answers this link

and the reply (``EdgeCore.reply``) tells the device to wait, to go on from a step, or that
its round is done.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from common import messages as m
from edge import rounds
from edge.lifecycle import Event as E, Pulling, State as S
from edge.ports import DeviceAttach
from edge.records import Entry

if TYPE_CHECKING:
    from edge.core import EdgeCore


def on_attach(core: EdgeCore, ev: DeviceAttach) -> None:
    """A device attaches (parked until the central has welcomed this edge): its new link
    replaces any older one, and its request is a join or a resume."""
    req = ev.req
    if not core.up:
        core.parked.append(ev)
        return
    if req.device not in core.known_devices:
        ev.port.post(m.AttachReply(ok=False, reason=f"{req.device!r} is not a device of this testbed",
                                   run_name="", mode=core.mode, action="wait", round=0, resume_step=0, how="",
                                   state_bytes=0, transfer_ms=0.0))
        ev.port.close()
        return
    e = core.entry(req.device)
    if e.port is not None and e.port is not ev.port:
        e.port.close(notice=m.Replaced(), drain=False)
    e.port = ev.port
    e.last_round = max(e.last_round, req.last_round)
    if req.edge_key:
        core.attach_keys[req.device] = req.edge_key
    core.events.emit("attached", device=req.device, kind=req.kind, why=req.why, source=req.source,
                     round=req.round, step=req.step, state=e.state.value)
    if req.kind == "resume" and req.run and core.run_name and req.run != core.run_name:
        # state of another run (left on a device's disk by a crash): of no use here
        core.events.emit("other_run", device=req.device, run=req.run)
        _join(core, e)
    elif req.kind == "join":
        _join(core, e)
    else:
        _resume(core, e, req)


def _join(core: EdgeCore, e: Entry) -> None:
    """The device holds no round state: the current round from its start if it takes
    part (a restarted device does the whole round again, exactly), else wait."""
    if e.state is S.DELIVERING:
        core.move(e, E.ATTACH)
        core.reply(e, action="wait", how="delivering")
        return
    info = core.current
    core.reply(e, action="wait", how="join")
    if info is not None and core.takes_part(e.device, info.round) and e.last_round < info.round:
        old = e.session
        if old is not None and old.round == info.round and old.step > 0:
            # a device process started again with nothing: its round again from the start
            core.central.send(m.FaultReport(kind="restarted", process=e.device, peer=core.name, round=info.round,
                                            step=old.step, detail="the device process started again without "
                                            "a checkpoint: its round again from the round's weights",
                                            replayed=old.step, recovery="restart"))
        rounds.start_session(core, e)  # a fetch under way no longer counts
    else:
        core.move(e, E.NO_SESSION)


def _resume(core: EdgeCore, e: Entry, req: m.AttachRequest) -> None:
    """The device holds a session of round ``req.round`` at step ``req.step``."""
    r, s = req.round, req.step
    delivering, pulling = e.delivering, e.pulling
    if delivering is not None:
        core.move(e, E.ATTACH)
        if (delivering.update.round, delivering.update.steps) == (r, s):
            # It lost our DoneAck: it sends its update again and gets the ack once the
            # central confirms.
            core.reply(e, action="continue", round=r, resume_step=s, how="delivering")
        else:
            # Its round's update is on its way from here; whatever the device holds of
            # that round is not what counts.
            core.reply(e, action="wait", round=r, how="delivering")
        return
    if pulling is not None:
        core.move(e, E.ATTACH)  # the fetch goes on; its outcome answers this link
        pulling.request = req
        return
    ours = e.session
    if ours is not None and ours.round == r and ours.position_matches(s) and (
            req.source == core.name or e.state is S.HANDING_OVER):
        # Its session is here: a link that came back (or a device that returned before
        # our handover finished; the late confirmation will be refused).
        if e.state is S.HANDING_OVER:
            core.events.emit("handover_cancelled", device=e.device, round=r, step=s)
        core.move(e, E.RESUME)
        core.reply(e, action="continue", round=r, resume_step=s, how="here")
        return
    begin_resume(core, e, req, attached=True)


def begin_resume(core: EdgeCore, e: Entry, req: m.AttachRequest, *, attached: bool = False) -> None:
    """The session is not here (or not where the device is): fetch it, rebuild it from
    the round's weights, or tell the device its round is over. ``attached``: decided as
    the device attaches (else again, after a fetch's outcome)."""
    r, s = req.round, req.step
    info = core.current
    fwd = core.forward.get(e.device)
    if core.delivered.get(e.device, 0) >= r:
        core.move(e, E.NO_SESSION)
        if e.port is not None:
            core.reply(e, action="done", round=r, how="delivered")
        return
    if info is None or info.round < r:
        # We have not been told of round r yet (our link to the central lags): wait for it.
        core.move(e, E.FETCH, Pulling(req))
        core.events.emit("awaiting_round", device=e.device, round=r)
        return
    if info.round > r or not core.takes_part(e.device, r):
        core.move(e, E.NO_SESSION)
        if e.port is not None:
            core.reply(e, action="wait", round=r, how="round over")
        if e.port is not None and core.takes_part(e.device, info.round):
            rounds.start_session(core, e)
        return
    source = req.source
    if attached and source == core.name and fwd is not None and fwd.round == r:
        source = fwd.target  # we handed it on; the device missed the other edge's reply
    if source != core.name and core.handover.attached_elsewhere(e, req, source):
        return  # the policy answers the device
    # Modes restart and classic keep no state to fetch (restart: the round from its
    # weights; classic: the device trains alone); fedfly at step 0: the round's weights
    # are the whole session. Here with no session at all: the round again, exactly.
    resume = 0 if core.mode == "restart" else s
    how = "fresh"
    if source == core.name and core.mode == "fedfly" and s > 0:
        if core.handover.session_lost_here(e, req):
            return
        resume, how = 0, "restart"  # the device says its session is here, and it is not
    core.fresh(e, info, resume)
    if e.port is not None:
        core.reply(e, action="continue", round=r, resume_step=resume, how=how)
