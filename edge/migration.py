"""Moving a device's session between edges: the destination's fetches on worker threads
(the protocols themselves, both sides, are in ``edge.handover``: ``pull``, ``offer``,
``replica``, ``restart``).

Destination B (``Fetcher``, a worker thread)       Source A (``edge.handover.pull``, its core)
    SessionPull(device, round, step) ------------>  position checked, snapshot taken
                               <------------------  SessionSnapshot(meta, tensors, checksum)
    verify checksum, rebuild; the core installs
    it and answers the device at once
    SessionInstalled(checksum) ------------------>  checksum matches: drop the session
                               <------------------  SessionReleased
                                                    (a later pull for it: "moved to B")

A keeps the session until B has proved it holds an identical copy; if B never confirms,
A's copy stays (DETACHED) and is never used unless the device names A again, which it does
only if B's answer never reached it: the device's last successful attach names the one
copy that counts. A's refusal can name where the session went (``moved_to``), so a device
that missed an answer is found by following the pointers. Modes restart and classic move
no state: ``drop`` makes A forget the session, off the device's path.

The links to the other edges are kept open between handovers (``edge.peers``), so a move
does not pay a TCP connect and a handshake.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Callable

import torch

from common import codec
from common import messages as m
from common.errors import MigrationError, ProtocolError, TransportError
from common.link import Link
from edge.checksum import snapshot_checksum
from edge.peers import PeerExchange, PeerLinks
from edge.ports import PullOutcome
from edge.session import EdgeSession, SparePart

log = logging.getLogger("edge")


class Fetcher:
    """The destination's side, one worker thread per handover; every outcome goes to the
    core as a ``PullOutcome`` (through ``submit``)."""

    def __init__(self, *, name: str, peers: PeerLinks, submit: Callable[[object], None], model: str,
                 cut_of: Callable[[str], int], spare: SparePart | None, events,
                 replicator: "Replicator | None" = None) -> None:
        self.name = name
        self.replicator = replicator
        self.peers = peers
        self.submit = submit
        self.model, self.cut_of = model, cut_of  # cut_of(device): that device's split layer
        self.spare = spare
        self.events = events

    def pull(self, *, device: str, source: str, round: int, step: int, token: int,
             proofs: dict[str, str]) -> None:
        threading.Thread(target=self._pull_guarded, args=(device, source, round, step, token, proofs),
                         name=f"pull-{device}", daemon=True).start()

    def drop(self, *, device: str, source: str, round: int, proofs: dict[str, str]) -> None:
        threading.Thread(target=self._drop_guarded, args=(device, source, round, proofs), name=f"drop-{device}",
                         daemon=True).start()

    def _pull_guarded(self, device: str, source: str, round: int, step: int, token: int,
                      proofs: dict[str, str]) -> None:
        """Whatever goes wrong, the core hears an outcome (a device never waits on a
        worker that died)."""
        outcome = PullOutcome(device=device, token=token, source=source)
        try:
            self._pull(outcome, round, step, proofs)
        except Exception as exc:  # noqa: BLE001 - a bug here must fail the pull, not strand it
            log.exception("%s: pull of %s from %s failed", self.name, device, source)
            if outcome.session is None:
                outcome.error = f"handover of {device} from {source} failed: {type(exc).__name__}: {exc}"
                self.submit(outcome)

    def offer_link(self, peer: str) -> Link | None:
        """The kept link to ``peer`` to offer a session on, or None (none open yet: one is
        opened in the background, and this handover is pulled as before)."""
        return self.peers.kept(peer)

    def prepare_offer(self, *, device: str, source: str, offer: m.SessionOffer, checksum: str) -> Future:
        """Verify ``offer`` against ``checksum`` and rebuild it now, on a worker thread, so
        that the device that comes for it finds it ready (the session was sent while the
        device still computed its last step). The result (or the error) is in the future."""
        done: Future = Future()

        def build() -> None:
            try:
                session = self._rebuild(device, source, offer, checksum, offer.round)
            except BaseException as exc:  # noqa: BLE001 - every failure is the future's
                done.built_at = time.monotonic()  # type: ignore[attr-defined]
                done.set_exception(exc)
            else:
                done.built_at = time.monotonic()  # type: ignore[attr-defined]
                done.set_result(session)
        threading.Thread(target=build, name=f"offer-{device}", daemon=True).start()
        return done

    def take_offer(self, *, device: str, source: str, token: int, offer: m.SessionOffer, checksum: str, port,
                   since: float, prepared: Future) -> None:
        """Hand the core the session ``prepared`` from ``offer`` as a ``PullOutcome``, as soon
        as it is built (at once, on this thread, if it is already). A copy that failed its
        checks is declined on ``port``; one that passed carries the ``SessionInstalled`` the
        core sends once it has installed it. ``since``: when the offer's notice came
        (``time.monotonic``), the start of its ``transfer_ms``, which ends when it was
        rebuilt."""
        prepared.add_done_callback(lambda f: self._offer_ready(device, source, token, offer, checksum, port, since, f))

    def _offer_ready(self, device: str, source: str, token: int, offer: m.SessionOffer, checksum: str, port,
                     since: float, built: Future) -> None:
        outcome = PullOutcome(device=device, token=token, source=source, offered=True)
        exc = built.exception()
        if exc is not None:  # a bad copy is declined; the core pulls instead
            outcome.error = f"offer of {device} from {source}: {type(exc).__name__}: {exc}"
            port.post(m.OfferDeclined(device=device, round=offer.round, step=offer.step))
        else:
            session = built.result()
            outcome.session = session
            outcome.state_bytes = sum(t.numel() * t.element_size() for t in offer.state.values())
            outcome.confirm = (port, m.SessionInstalled(device=device, round=offer.round, step=session.step,
                                                        checksum=checksum),
                               m.OfferDeclined(device=device, round=offer.round, step=offer.step))
        # from its notice to its rebuild, not to its device's attach (which may come later)
        outcome.transfer_ms = (getattr(built, "built_at", time.monotonic()) - since) * 1000
        self.submit(outcome)

    def pull_replica(self, *, device: str, source: str, round: int, steps: list[int], token: int,
                     proofs: dict[str, str]) -> None:
        threading.Thread(target=self._replica_guarded, args=(device, source, round, list(steps), token, proofs),
                         name=f"replica-{device}", daemon=True).start()

    def replicate(self, device: str, round: int, step: int, meta: dict, tensors: dict, *, edge_key: str = "") -> None:
        if self.replicator is not None:
            self.replicator.send(device, round, step, meta, tensors, edge_key=edge_key)

    def _replica_guarded(self, device: str, source: str, round: int, steps: list[int], token: int,
                         proofs: dict[str, str]) -> None:
        t0 = time.perf_counter()
        outcome = PullOutcome(device=device, token=token, source=source, replica=True)
        try:
            with self.peers.exchange(source, device) as ex:
                outcome.session = self._fetch(ex, outcome, m.ReplicaPull(device=device, round=round, steps=steps,
                                                                         target=self.name, proofs=proofs),
                                              lambda s: s.step in steps, f"round {round} at one of {steps}")[0]
        except Exception as exc:  # noqa: BLE001 - every failure is an outcome: the round again from its start
            outcome.error = f"replica of {device} from {source}: {type(exc).__name__}: {exc}"
        outcome.transfer_ms = (time.perf_counter() - t0) * 1000
        self.submit(outcome)

    def _fetch(self, ex: PeerExchange, outcome: PullOutcome, request: m.Message, fits: Callable[[EdgeSession], bool],
               expected: str) -> tuple[EdgeSession | None, str]:
        """Send ``request``; the session the peer answers with, verified and rebuilt (and its
        checksum), or (None, "") with ``outcome.refused`` set. Raises ``MigrationError``."""
        device, round_ = outcome.device, request.round  # type: ignore[attr-defined]
        before = ex.link.conn.bytes_received
        ex.send(request)
        reply = ex.recv()
        if isinstance(reply, m.PullRefused) and reply.device == device:
            outcome.refused = reply
            return None, ""
        if not (isinstance(reply, m.SessionSnapshot) and reply.device == device):
            raise MigrationError(f"{outcome.source} answered {request.TYPE} with {reply.TYPE}")
        outcome.state_bytes = ex.link.conn.bytes_received - before
        return self._rebuild(device, outcome.source, reply, reply.checksum, round_, fits, expected), reply.checksum

    def _rebuild(self, device: str, source: str, msg: m.SessionSnapshot | m.SessionOffer, checksum: str, round_: int,
                 fits: Callable[[EdgeSession], bool] = lambda s: True, expected: str = "") -> EdgeSession:
        """``msg``'s session from ``source``, verified against ``checksum`` and rebuilt; it
        must be ``device``'s of ``round_`` and ``fits``. Raises ``MigrationError``."""
        session = EdgeSession.from_snapshot(msg.meta, msg.state, checksum, expect_model=self.model,
                                           expect_split=self.cut_of(device), spare=self.spare,
                                           digests=_state_digests(msg))
        if (session.device, session.round) != (device, round_) or not fits(session):
            raise MigrationError(f"{source} sent {session.device} round {session.round} step "
                                 f"{session.step}, expected {device} {expected or f'round {round_}'}")
        return session

    def _drop_guarded(self, device: str, source: str, round: int, proofs: dict[str, str]) -> None:
        try:
            self._drop(device, source, round, proofs)
        except Exception:  # noqa: BLE001 - best effort, off the device's path
            log.exception("%s: drop of %s at %s failed", self.name, device, source)

    def _pull(self, outcome: PullOutcome, round: int, step: int, proofs: dict[str, str]) -> None:
        device, source = outcome.device, outcome.source
        t0 = time.perf_counter()
        try:
            with self.peers.exchange(source, device) as ex:
                session, checksum = self._fetch(ex, outcome, m.SessionPull(device=device, round=round, step=step,
                                                                           target=self.name, proofs=proofs),
                                                lambda s: s.position_matches(step), f"round {round} step {step}")
                if session is not None:
                    outcome.session = session
                    outcome.transfer_ms = (time.perf_counter() - t0) * 1000
                    # The core answers the device now; the source is told in parallel.
                    self.submit(outcome)
                    ex.send(m.SessionInstalled(device=device, round=round, step=session.step, checksum=checksum))
                    done = ex.recv()
                    confirmed = isinstance(done, m.SessionReleased) and done.device == device
                    self.events.emit("handover_confirmed" if confirmed else "handover_unconfirmed", device=device,
                                     source=source, round=round, step=step)
                    return
        except (MigrationError, TransportError, ProtocolError, TimeoutError) as exc:
            if outcome.session is not None:  # the session is installed; only the confirmation failed
                self.events.emit("handover_unconfirmed", device=device, source=source, round=round, step=step,
                                 detail=str(exc)[:200])
                return
            outcome.error = f"handover of {device} from {source} failed: {exc}"
        outcome.transfer_ms = (time.perf_counter() - t0) * 1000
        self.submit(outcome)

    def _drop(self, device: str, source: str, round: int, proofs: dict[str, str]) -> None:
        try:
            with self.peers.exchange(source, device) as ex:
                ex.send(m.SessionDrop(device=device, round=round, target=self.name, proofs=proofs))
                done = ex.recv()
                ok = isinstance(done, m.SessionReleased)
        except (MigrationError, TransportError, ProtocolError, TimeoutError) as exc:
            ok = False
            log.info("%s: could not tell %s to drop %s's session: %s", self.name, source, device, exc)
        self.events.emit("drop_sent", device=device, source=source, round=round, confirmed=ok)


def _state_digests(msg: m.Message) -> dict[str, bytes] | None:
    """The digests of ``msg.state``'s tensors as their bytes arrived, by name (None for a
    message that was not received over a connection)."""
    digests = codec.arrival_digests(msg)
    return None if digests is None else {key: d for (field, key), d in digests.items() if field == "state"}


def buddy_of(edge: str, edges: list[str]) -> str | None:
    """The edge that keeps ``edge``'s replicas: the next one in name order (a ring)."""
    ring = sorted(edges)
    if len(ring) < 2 or edge not in ring:
        return None
    return ring[(ring.index(edge) + 1) % len(ring)]


class Replicator:
    """Sends copies of sessions to this edge's buddy, off the training path: the core hands
    over a copy of the state (``send``) and goes on training; a worker thread checksums it
    and posts it on the kept link. Only the newest copy per device waits: an older one
    still queued is replaced (the buddy needs the latest, not every one)."""

    def __init__(self, *, name: str, buddy: str, peers: PeerLinks, events) -> None:
        self.name, self.buddy = name, buddy
        self.peers = peers
        self.events = events
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[int, int, dict, dict[str, torch.Tensor]]] = {}
        self._wake = threading.Event()
        self._closed = False
        self.sent = 0
        self._thread = threading.Thread(target=self._run, name=f"{name}-replicator", daemon=True)
        self._thread.start()

    def send(self, device: str, round: int, step: int, meta: dict, tensors: dict[str, torch.Tensor], *,
             edge_key: str = "") -> None:
        with self._lock:
            self._pending[device] = (round, step, meta, tensors, edge_key)
        self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            self._wake.wait()
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    if not self._pending:
                        break
                    device = next(iter(self._pending))
                    round_, step, meta, tensors, edge_key = self._pending.pop(device)
                try:
                    checksum = snapshot_checksum(meta, tensors)
                    link = self.peers.link(self.buddy)
                    link.post(m.SessionReplica(device=device, round=round_, step=step, target=self.name, meta=meta,
                                               checksum=checksum, state=tensors, edge_key=edge_key))
                    self.sent += 1
                except Exception as exc:  # noqa: BLE001 - a copy that does not go is only a copy
                    self.events.emit("replica_failed", device=device, round=round_, step=step, to=self.buddy,
                                     detail=f"{type(exc).__name__}: {exc}"[:200])
