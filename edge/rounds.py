"""The central's side of the edge's core: a round starts (every entry learns it: a fresh
session, a "round over", or a decision that waited for it), and a device's update is
confirmed delivered. Also how a session of the round is built and its work sent out.

Called by the core (``edge.core``) on its own thread; states change only through
``EdgeCore.move``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from common import messages as m
from common.errors import RemoteProtocolError
from common.models import weights_problem
from common.strategies import strategy_class
from common.strategies.base import returns_of, round_share
from edge.lifecycle import Event as E
from edge.ports import Stop
from edge.records import Entry, RoundInfo
from edge.session import EdgeSession

if TYPE_CHECKING:
    from edge.core import EdgeCore

log = logging.getLogger("edge")


def on_central(core: EdgeCore, msg: m.Message) -> None:
    """What the central sends the core: a round's start, an update's ack, the end."""
    if isinstance(msg, m.RoundStart):
        _round_start(core, msg)
    elif isinstance(msg, m.UpdateAck):
        _update_acked(core, msg)
    elif isinstance(msg, m.Shutdown):
        core.stop(Stop(reason=msg.reason))
    else:
        raise RemoteProtocolError(f"{core.role}: the central sent {msg.TYPE}, which it never should")


def _round_start(core: EdgeCore, msg: m.RoundStart) -> None:
    """A round starts: what came is checked before any session is built from it, then
    every entry learns it."""
    plan = msg.round_plan
    if problem := weights_problem(msg.weights, core.spec):  # before any session is built from them
        raise RemoteProtocolError(f"{core.role}: RoundStart of round {plan.round}: {problem}")
    for k, t in msg.algo.items():  # the strategy's tensors, each for one parameter of the model
        want = core.spec.get(k.split("/", 2)[-1])
        if k.count("/") < 2 or want is None or (tuple(t.shape), t.dtype) != want:
            raise RemoteProtocolError(f"{core.role}: RoundStart of round {plan.round}: strategy tensor {k!r} "
                                      "does not fit the model")
    if any(not 1 <= a < plan.round for a in msg.adopt.values()):
        raise RemoteProtocolError(f"{core.role}: RoundStart of round {plan.round}: adopt names a round "
                                  "that is not before it")
    if core.current is not None and plan.round <= core.current.round:
        return  # sent again after we rejoined: we have it
    core.current = RoundInfo(plan, msg.weights, msg.algo, msg.adopt)
    core.models.splits.update(plan.cuts)  # cuts chosen at start (split_layer = "auto")
    r = plan.round
    core.central.round_started(r)
    core.recovery.round_start(r)
    core.forward = {d: f for d, f in core.forward.items() if f.round >= r}
    core.handover.round_start(r)
    core.events.emit("round_start", round=r, participants=list(plan.participants))
    for e in list(core.entries.values()):
        try:
            _entry_round_start(core, e, r)
        except Exception as exc:  # noqa: BLE001 - one entry's bug must not cost the others their round
            log.exception("%s: round %d start for %s failed", core.role, r, e.device)
            core.events.emit("core_error", on="RoundStart", device=e.device, error=type(exc).__name__,
                             detail=str(exc)[:300])


def _entry_round_start(core: EdgeCore, e: Entry, r: int) -> None:
    """Round ``r`` for ``e``: a fresh session if its device takes part, an attach that
    waited for it decided, or its old round over."""
    if e.session is not None and e.session.round >= r:
        return
    pulling = e.pulling
    if pulling is not None and pulling.request.round >= r:
        _resolve_pending(core, e)  # it was waiting for this very round
        return
    old_round = e.session.round if e.session is not None else (pulling.request.round if pulling else 0)
    if e.port is None:
        core.move(e, E.ROUND_START)
        return
    if pulling is not None:
        # The device waits for an answer to its attach: its round is over.
        core.reply(e, action="wait", round=old_round, how="round over")
    if core.takes_part(e.device, r):
        start_session(core, e)
    else:
        core.move(e, E.ROUND_START)
        if old_round and pulling is None:
            e.port.post(m.StandBy(round=old_round, reason=f"round {old_round} is over; "
                                  f"{e.device} is not in round {r}"))


def _resolve_pending(core: EdgeCore, e: Entry) -> None:
    """A PULLING entry that waited for the round's weights: decide again, now."""
    pulling = e.pulling
    assert pulling is not None
    if e.port is None:
        core.move(e, E.ROUND_START)
        return
    core.begin_resume(e, pulling.request)


def _update_acked(core: EdgeCore, msg: m.UpdateAck) -> None:
    core.central.acked(msg.device, msg.round)
    core.delivered[msg.device] = max(core.delivered.get(msg.device, 0), msg.round)
    e = core.entries.get(msg.device)
    delivering = e.delivering if e is not None else None
    if e is None or delivering is None or delivering.update.round != msg.round:
        return
    if e.port is not None:
        e.port.post(m.DoneAck(round=msg.round))
    core.move(e, E.UPDATE_ACKED)  # IDLE (GONE if not linked)


def start_session(core: EdgeCore, e: Entry) -> None:
    """A fresh session of the current round, and the round's work sent to the device."""
    info = core.current
    assert info is not None and e.port is not None
    core.fresh(e, info, 0)
    dev_keys, edge_keys = core.models.keys(e.device)
    keys = dev_keys + (edge_keys if core.mode == "classic" else [])
    e.port.post(m.DeviceRound(plan=info.plan.to_wire(), weights={k: info.weights[k] for k in keys},
                              algo={**round_share(info.algo, keys), **returns_of(info.algo, e.device)},
                              adopt=info.adopt.get(e.device, 0)))


def new_session(core: EdgeCore, device: str, info: RoundInfo) -> EdgeSession:
    """``device``'s session of the round from its weights. With an algorithm that keeps
    a state on the device (SCAFFOLD's ``c_i``), it waits for the device's
    (``ClientState``): every reply that lets the device go on says so
    (``AttachReply.client_state``), and a ``DeviceRound`` always asks for it."""
    edge_keys = core.models.keys(device)[1]
    edge_state = None if core.mode == "classic" else {k: info.weights[k] for k in edge_keys}
    client = strategy_class(info.plan.algo.name).CLIENT
    return EdgeSession(device=device, round=info.round, mode=core.mode, model=core.models.name,
                       split_layer=core.models.cut(device), lr=info.plan.lr, momentum=info.plan.momentum,
                       part_state=edge_state, seed=core.seed, algo=info.plan.algo,
                       algo_tensors=round_share(info.algo, edge_keys),
                       awaits_state=client is not None and client.keeps_state and core.mode != "classic")
