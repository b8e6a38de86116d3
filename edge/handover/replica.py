"""Replica recovery: a session whose edge died is taken up from a copy its buddy keeps
(``faults.checkpoint_steps``, mode fedfly). Used by every policy when the session it
wants cannot be had; the device rolls back to the copy's step and the steps since are
trained again (same batches, same seeds: the same result).

Edge A (its core; the send on                       A's buddy K (its core)
``edge.migration.Replicator``'s thread)
    every ``checkpoint_steps`` steps:
    SessionReplica(device, round, step, state) -->  kept, the newest few per device
    ... A dies; the device attaches to B naming A
B (its core; the fetch on a worker)
    a copy kept here at a step the device holds?
    installed at once. Else:
    ReplicaPull(device, round, steps, proofs) --->  K: the newest copy at one of ``steps``,
                                                    the proof checked against A's key
                               <------------------  SessionSnapshot (a copy: K keeps it)
    verified, rebuilt, installed: the device
    continues from the copy's step
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from common import messages as m
from common.errors import MigrationError
from edge.handover.base import Handover
from edge.lifecycle import Event, State
from edge.ports import Port, PullOutcome
from edge.session import EdgeSession

if TYPE_CHECKING:
    from edge.core import Entry

S, E = State, Event


@dataclass
class Replica:
    """A copy of another edge's session, kept for the day that edge dies. Kept as it came
    (verified only when it is used)."""
    source: str
    round: int
    step: int
    meta: dict
    checksum: str
    tensors: dict[str, torch.Tensor]
    edge_key: str = ""  # ``source``'s key for the device's proofs of attachment


class Recovery(Handover):
    name = "replica"

    # -- the source's side: copies out, to the buddy -----------------------------------------

    def replicate(self, session: EdgeSession) -> None:
        """A copy of ``session`` as it is now, to the buddy. The copy is taken here, between
        two steps (a memory copy); checksum and send happen on the replicator's thread."""
        meta, tensors = session._parts(with_reply=False)
        copy = {k: v.detach().clone() for k, v in tensors.items()}
        self.core.fetcher.replicate(session.device, session.round, session.step, meta, copy,
                                    edge_key=self.core.attach_keys.get(session.device, ""))

    # -- the buddy's side: copies kept, and handed out ---------------------------------------

    def peer_handlers(self) -> dict[type, Callable[[Port, m.Message], None]]:
        return {m.SessionReplica: self.on_replica, m.ReplicaPull: self.on_replica_pull}

    def on_replica(self, port: Port, msg: m.SessionReplica) -> None:
        core = self.core
        if core.current is not None and msg.round < core.current.round:
            return  # of a round that is over
        self.keep(msg.device, Replica(msg.target, msg.round, msg.step, msg.meta, msg.checksum, msg.state,
                                      msg.edge_key))

    def keep(self, device: str, rep: Replica) -> None:
        replicas = self.core.replicas
        reps = [x for x in replicas.get(device, []) if (x.round, x.step) != (rep.round, rep.step)]
        reps.append(rep)
        reps.sort(key=lambda x: (x.round, x.step))
        # the newest few (faults.replicas_kept): a device's own checkpoints lag the session by
        # up to a step (its edge trains a step before the device does), and a copy takes time
        replicas[device] = reps[-self.core.replicas_kept:]

    def at(self, device: str, round: int, steps: list[int]) -> Replica | None:
        """The newest copy of ``device``'s session in ``round`` at one of ``steps``."""
        fits = [x for x in self.core.replicas.get(device, []) if x.round == round and x.step in steps]
        return fits[-1] if fits else None

    def on_replica_pull(self, port: Port, msg: m.ReplicaPull) -> None:
        core = self.core
        rep = self.at(msg.device, msg.round, msg.steps)
        if rep is None or not core.proven(msg, rep.edge_key, rep.source):
            core.refuse(port, msg.device, "refused")  # what we hold is not told
            core.events.emit("replica_refused", device=msg.device, round=msg.round, to=msg.target,
                             have_steps=[x.step for x in core.replicas.get(msg.device, [])])
            return
        port.post(m.SessionSnapshot(device=msg.device, round=rep.round, step=rep.step, meta=rep.meta,
                                    checksum=rep.checksum, state=rep.tensors))
        core.events.emit("replica_given", device=msg.device, round=rep.round, step=rep.step, to=msg.target)

    def round_start(self, r: int) -> None:
        core = self.core
        core.replicas = {d: kept for d, reps in core.replicas.items() if (kept := [x for x in reps if x.round >= r])}

    # -- the destination's side: a lost session from a copy ----------------------------------

    def recover(self, e: "Entry", *, source: str, detail: str) -> bool:
        """The PULLING entry's session cannot be had from ``source``: a copy kept here at a
        step the device holds is installed now, or one is asked of the dead edge's buddy
        (True; the outcome comes later). False: no copy can be had."""
        core = self.core
        req = e.pending
        assert req is not None
        r, s = req.round, req.step
        info = core.current
        if not (core.checkpoint_steps and req.checkpoints and info is not None and info.round == r):
            return False
        # The session died with its edge: a copy at a step the device can go back to.
        lost = source or req.source
        rep = self.at(e.device, r, [c for c in req.checkpoints if c <= s])
        if rep is not None:
            try:  # from copies: the session adopts what it is built from, and the replica stays kept
                session = EdgeSession.from_snapshot(rep.meta, {k: v.clone() for k, v in rep.tensors.items()},
                                                    rep.checksum, expect_model=core.models.name,
                                                    expect_split=core.models.cut(e.device), spare=core.spare)
            except MigrationError as exc:
                core.events.emit("replica_damaged", device=e.device, detail=str(exc)[:200])
            else:
                core.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
                self.install(e, session, source=core.name, state_bytes=0, transfer_ms=0.0)
                return True
        keeper = core.buddy_of(lost)
        if keeper is not None and keeper != core.name and keeper in core.peers:
            core.events.emit("pull_failed", device=e.device, source=source, round=r, step=s, detail=detail)
            e.pull_token = core.new_token()
            e.pull_at = core.clock()
            core.fetcher.pull_replica(device=e.device, source=keeper, round=r, steps=list(req.checkpoints),
                                      token=e.pull_token, proofs=req.proofs)
            return True
        return False

    def answered(self, e: "Entry", ev: PullOutcome) -> None:
        """The buddy's answer to the PULLING entry ``e``'s ``ReplicaPull``."""
        req = e.pending
        assert req is not None
        if ev.session is not None and ev.session.step in req.checkpoints and ev.session.step <= req.step:
            self.install(e, ev.session, source=ev.source, state_bytes=ev.state_bytes, transfer_ms=ev.transfer_ms)
        else:
            self.core.handover.failed(e, source=ev.source, detail=ev.error or (
                ev.refused.reason if ev.refused else "replica at the wrong step"), replica_tried=True)

    def install(self, e: "Entry", session: EdgeSession, *, source: str, state_bytes: int,
                transfer_ms: float) -> None:
        """The device and the session go back to the replica's step; the steps since are
        trained again (same batches, same seeds: the same result)."""
        core = self.core
        req = e.pending
        assert req is not None
        r, s, c = req.round, req.step, session.step
        core.central.send(m.FaultReport(kind="handover_failed", process=core.name, peer=req.source, round=r, step=s,
                                        detail=f"session of {e.device} lost with {req.source}; replica of step {c} "
                                               f"from {source}", detected_s=0.0, down_s=0.0, replayed=s - c,
                                        recovery="replica", samples_lost=0))
        core.events.emit("replica_installed", device=e.device, source=source, round=r, step=c, device_step=s)
        e.pending = None
        e.session = session
        if e.port is None:
            core.move(e, E.PULLED, S.DETACHED)
            return
        core.move(e, E.PULLED, S.ACTIVE)
        core.reply(e, action="continue", round=r, resume_step=c, how="replica", state_bytes=state_bytes,
                   transfer_ms=transfer_ms)
