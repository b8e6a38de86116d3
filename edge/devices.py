"""What a linked device sends its edge, and its link's loss: its steps (trained on the
edge's part), its round's end (its update goes to the central), its kept state, its
planned leave, its reports for the central. A device that sends what it may not loses
that link (a typed error; it may attach again), never the edge.

Called by the core (``edge.core``) on its own thread, a device's events in their order;
states change only through ``EdgeCore.move``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from common import messages as m
from common.bounds import weights_bound_problem
from common.errors import FrameTooLarge, RemoteProtocolError
from edge import reports
from edge.lifecycle import Delivering, Event as E, State as S, TransitionError
from edge.ports import DeviceLost, DeviceMessage
from edge.records import Entry
from edge.trainer import StepJob

if TYPE_CHECKING:
    from edge.core import EdgeCore


def on_message(core: EdgeCore, ev: DeviceMessage) -> None:
    """A device's message on its current link (one from a replaced link is stale)."""
    e = core.entries.get(ev.device)
    msg = ev.msg
    if isinstance(msg, (m.MigrationReport, m.FaultReport)):
        _report(core, ev, e, msg)
        return
    if e is None or e.port is not ev.port:
        return  # from a link that was replaced: stale
    try:
        if isinstance(msg, m.Activations):
            _step(core, e, msg)
        elif isinstance(msg, m.Leaving):
            _leaving(core, e, msg)
        elif isinstance(msg, m.DeviceDone):
            _finish(core, e, msg)
        elif isinstance(msg, m.ClientState):
            _client_state(core, e, msg)
        else:
            raise RemoteProtocolError(f"{core.role} (serving {e.device}, {e.state.name}): "
                                      f"{msg.TYPE} is not allowed")
    except (TransitionError, RemoteProtocolError) as exc:
        drop_link(core, e, RemoteProtocolError(str(exc)))


def _leaving(core: EdgeCore, e: Entry, msg: m.Leaving) -> None:
    """The device stops here at ``msg.step`` for a planned move to ``msg.to``: the
    policy's (an offer sends the session ahead; otherwise held as for a lost link)."""
    if e.state is not S.ACTIVE:
        return  # a late one (the link's end follows): nothing to move
    core.handover.leaving(e, msg)


def _client_state(core: EdgeCore, e: Entry, msg: m.ClientState) -> None:
    """The device's kept state for the session that waits for it (``awaits_state``),
    checked against the edge part; for any other (a copy sent again, a session of
    another round) it is not needed: ignored."""
    session = e.session
    if session is None or session.round != msg.round or not session.awaits_state:
        return
    keys = [n for n, _ in session.named_parameters()]
    spec = {f"{tag}/{k}": core.spec[k] for k in keys for tag in {n.partition("/")[0] for n in msg.state}}
    if msg.state and (problem := weights_bound_problem(msg.state, spec)):
        raise RemoteProtocolError(f"{core.role}: ClientState of {e.device} for round {msg.round}: {problem}")
    session.take_state(msg.state)


def _step(core: EdgeCore, e: Entry, msg: m.Activations) -> None:
    session = e.session
    if e.state is not S.ACTIVE or session is None or session.round != msg.round or core.mode == "classic":
        if e.state is S.ACTIVE and session is not None and session.round == msg.round:
            raise RemoteProtocolError(f"{core.role}: Activations from {e.device} in mode classic")
        core.move(e, E.STEP)  # a stale step: the table says whether it may be ignored
        core.events.emit("stale_step", device=e.device, round=msg.round, step=msg.step, state=e.state.value)
        return
    if session.awaits_state:
        raise RemoteProtocolError(f"{core.role}: step {msg.step} of {e.device} before its ClientState")
    port = e.port
    assert port is not None

    def reply(grad: torch.Tensor, loss: float, _r: int = msg.round, _s: int = msg.step) -> None:
        port.post(m.Gradients(round=_r, step=_s, loss=loss, grad={"g": grad}))
    x, y = msg.batch["x"], msg.batch["y"]  # in bounds (``EdgeCore._refused_on_arrival``)
    job = StepJob(e.device, session, msg.round, msg.step, x, y, reply, cut_first=core.cut_first)
    if core.trainer is None:
        core.stepped(e, job.run())
    else:
        core.training.add(e.device)
        core.trainer.submit(job)


def _finish(core: EdgeCore, e: Entry, msg: m.DeviceDone) -> None:
    if e.state is S.DELIVERING or (e.state is S.IDLE and core.delivered.get(e.device, 0) >= msg.round):
        core.move(e, E.FINISH)
        if e.state is S.IDLE:
            e.port.post(m.DoneAck(round=msg.round))  # type: ignore[union-attr]
        return
    session = e.session
    if e.state is not S.ACTIVE or session is None or session.round != msg.round:
        core.move(e, E.FINISH_STALE)
        core.events.emit("stale_update", device=e.device, round=msg.round, state=e.state.value)
        return
    dev_keys, edge_keys = core.models.keys(e.device)
    keys = dev_keys + (edge_keys if core.mode == "classic" else [])
    if problem := weights_bound_problem(msg.weights, {k: core.spec[k] for k in keys}):
        raise RemoteProtocolError(f"{core.role}: DeviceDone from {e.device} has the wrong weights: {problem}")
    if core.mode != "classic" and session.step != msg.steps:
        raise RemoteProtocolError(f"{core.role}: {e.device} finished after {msg.steps} steps, "
                                  f"its session here has {session.step}")
    weights = {**msg.weights, **session.weights()}
    update = m.DeviceUpdate(round=msg.round, device=e.device, edge=core.name, samples=msg.samples,
                            steps=msg.steps, train_seconds=msg.train_seconds, weights=weights)
    core.move(e, E.FINISH, Delivering(update))
    core.central.deliver(update)
    core.events.emit("device_done", device=e.device, round=msg.round, samples=msg.samples, steps=msg.steps,
                     train_seconds=msg.train_seconds, edge_steps=session.step)


def on_lost(core: EdgeCore, ev: DeviceLost) -> None:
    """A device's link closed, broke or went silent: its session is held here."""
    core.parked = [att for att in core.parked if att.port is not ev.port]
    e = core.entries.get(ev.device)
    if e is None or e.port is not ev.port:
        return
    e.port = None
    if isinstance(ev.error, FrameTooLarge):  # its link's decoder refused it (``common.bounds``): the device's fault
        _report_refusal(core, e.device, str(ev.error)[:200], round=e.session.round if e.session else 0,
                             step=e.session.step if e.session else 0)
    silent = ev.silent_s > 0
    core.events.emit("detached", device=e.device, state=e.state.value, detail=str(ev.error)[:200],
                     silent_s=round(ev.silent_s, 3))
    if silent:
        step = e.session.step if e.session is not None else 0
        rnd = e.session.round if e.session is not None else 0
        core.central.send(m.FaultReport(kind="peer_silent", process=core.name, peer=e.device, round=rnd, step=step,
                                        detail=str(ev.error)[:200], detected_s=round(ev.silent_s, 3),
                                        recovery="session held"))
    was = e.state
    if was in (S.ACTIVE, S.IDLE, S.DELIVERING, S.PULLING):
        core.move(e, E.LINK_LOST)
    if was is S.ACTIVE:
        core.handover.link_lost(e)


def _report(core: EdgeCore, ev: DeviceMessage, e: Entry | None, msg: m.FaultReport | m.MigrationReport) -> None:
    """A device's report goes on to the central if it speaks only for its sender, stamped
    with the identity that delivered it, within its link's budget (``edge.reports``)."""
    if ev.device not in core.known_devices:
        return
    try:
        msg = reports.screen(msg, device=ev.device, edges=set(core.edges),
                             by=reports.delivered_by(ev.port, ev.device))
    except reports.ReportRefused as exc:
        refuse_input(core, ev, exc, round=msg.round, step=msg.step)
        return
    if core.report_gate.admit(ev.device, ev.port, e.port if e is not None else None, core.clock()) is not None:
        core.central.send(msg)
    elif (dropped := core.report_gate.dropped(ev.device)) == 1 or dropped % 1000 == 0:
        core.events.emit("reports_dropped", device=ev.device, dropped=dropped, burst=core.report_gate.burst,
                         rate=core.report_gate.rate)


def refuse_input(core: EdgeCore, ev: DeviceMessage, exc: RemoteProtocolError, *, round: int, step: int) -> None:
    """A device sent what it may not: its link is closed with a typed error (it may
    attach again), and the central records it as that device's fault."""
    core.refused[ev.device] = ev.port
    detail = str(exc)[:300]
    core.events.emit("protocol_error", peer=f"device {ev.device}", detail=detail, error=type(exc).__name__)
    ev.port.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=detail), drain=True)
    _report_refusal(core, ev.device, detail, round=round, step=step)


def _report_refusal(core: EdgeCore, device: str, detail: str, *, round: int, step: int) -> None:
    core.central.send(m.FaultReport(kind="protocol_error", process=core.name, peer=device,
                                    round=min(max(round, 0), reports.MAX_ROUND), step=min(max(step, 0), reports.MAX_STEP),
                                    detail=detail[:200], recovery="link closed"))


def drop_link(core: EdgeCore, e: Entry, exc: RemoteProtocolError) -> None:
    """A device broke the protocol: its link goes (the device may attach again)."""
    core.events.emit("protocol_error", peer=f"device {e.device}", detail=str(exc)[:300], error=type(exc).__name__)
    if e.port is not None:
        e.port.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=str(exc)[:300]), drain=True)
