"""The edge's link to the central: join it, and rejoin it after a loss.

The first join may wait ``run.startup_timeout`` for a central that starts later; a lost
link (closed, reset, or silent past ``faults.dead_after_s``) is retried with backoff for
``faults.central_grace_s`` before the edge gives up. Meanwhile the edge keeps serving its
devices: every update (``deliver``) is kept until the central acknowledges it and is sent
again after a rejoin, as are the latest ``EdgeStatus`` and the reports sent while down.
What the central sends reaches the core as events.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from common import messages as m
from common import transport
from common.config import Config
from common.errors import AuthenticationError, ProtocolError, TransportError
from common.link import Link
from common.security import CENTRAL, Credentials
from edge.ports import CentralDown, CentralMessage, CentralUp, Stop

log = logging.getLogger("edge")

# Waits between tries to reach the central: short first (a restarted central listens
# again within moments), doubled up to a second, so the edge is back soon after it.
BACKOFF_FIRST_S = 0.05
BACKOFF_MAX_S = 1.0
# Reports (moves, faults) kept while the central is away; beyond this the oldest go.
MAX_HELD_REPORTS = 1000


class CentralLink:
    def __init__(self, *, cfg: Config, name: str, creds: Credentials, submit: Callable[[object], None], events,
                 on_welcome: Callable[[str], None] = lambda run_name: None) -> None:
        self.on_welcome = on_welcome
        self.cfg = cfg
        self.name = name
        self.creds = creds
        self.submit = submit
        self.events = events
        self.faults = cfg.faults
        self._lock = threading.Lock()
        self._link: Link | None = None
        self._lost = threading.Event()
        self._closed = False
        self._status: m.EdgeStatus | None = None
        self._unacked: dict[tuple[str, int], m.DeviceUpdate] = {}
        # Acknowledged updates of the current round, kept until the next round starts: a
        # central that crashes before it has summed them gets them again when it is back.
        self._retained: dict[tuple[str, int], m.DeviceUpdate] = {}
        self._held: list[m.Message] = []
        self.run_name: str | None = None
        self._thread = threading.Thread(target=self._run, name=f"{name}-central", daemon=True)

    def start(self) -> "CentralLink":
        self._thread.start()
        return self

    # -- the core's side (CentralPort) --------------------------------------------------------

    def send(self, msg: m.Message) -> None:
        with self._lock:
            if isinstance(msg, m.EdgeStatus):
                self._status = msg
            link = self._link
            if link is None or not link.post(msg):
                if not isinstance(msg, m.EdgeStatus):
                    self._held.append(msg)
                    del self._held[:-MAX_HELD_REPORTS]

    def deliver(self, update: m.DeviceUpdate) -> None:
        with self._lock:
            self._unacked[(update.device, update.round)] = update
            if self._link is not None:
                self._link.post(update)

    def acked(self, device: str, round: int) -> None:
        with self._lock:
            update = self._unacked.pop((device, round), None)
            if update is not None:
                self._retained[(device, round)] = update

    def round_started(self, round: int) -> None:
        """The central started ``round``: it has summed every earlier one."""
        with self._lock:
            for kept in (self._unacked, self._retained):
                for k in [k for k in kept if k[1] < round]:
                    del kept[k]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            link = self._link
        if link is not None:
            link.close()
        self._lost.set()

    # -- the link's life ------------------------------------------------------------------------

    def _connect(self) -> tuple[transport.Connection, m.Welcome]:
        c = self.cfg.central
        dead = self.faults.dead_after_s
        conn = transport.connect(c.host, c.port, creds=self.creds, expect=CENTRAL, peer="central", timeout=dead)
        try:
            conn.send(m.EdgeHello(edge=self.name))
            welcome = conn.recv(timeout=2 * dead)
            if not isinstance(welcome, m.Welcome):
                detail = f": {welcome.detail}" if isinstance(welcome, m.ErrorNotice) else ""
                raise ProtocolError(f"central answered EdgeHello with {welcome.TYPE}{detail}")
        except BaseException:
            conn.close()
            raise
        return conn, welcome

    def _run(self) -> None:
        try:
            self._run_links()
        except Exception as exc:  # noqa: BLE001 - a bug here must stop the edge, not leave it deaf
            log.exception("%s: the central link failed", self.name)
            self.submit(Stop(reason=f"central link failed: {type(exc).__name__}: {exc}", status=1))

    def _run_links(self) -> None:
        joined = False
        deadline = time.monotonic() + self.cfg.run.startup_timeout
        backoff = BACKOFF_FIRST_S
        while not self._closed:
            try:
                conn, welcome = self._connect()
            except AuthenticationError as exc:
                # A key that does not match never will: say so now rather than retry.
                log.error("%s: cannot join the central: %s", self.name, exc)
                self.events.emit("error", detail=f"cannot join central: {exc}")
                self.submit(Stop(reason=f"authentication with the central failed: {exc}", status=1))
                return
            except (TransportError, ProtocolError, TimeoutError) as exc:
                if time.monotonic() >= deadline:
                    what = "rejoin" if joined else "join"
                    log.error("%s: cannot %s the central: %s", self.name, what, exc)
                    self.events.emit("error", detail=f"cannot {what} central: {exc}")
                    self.submit(Stop(reason=f"central lost: {exc}", status=1))
                    return
                time.sleep(backoff)
                backoff = min(BACKOFF_MAX_S, backoff * 2)
                continue
            if self.run_name is not None and welcome.run_name != self.run_name:
                conn.close()
                self.submit(Stop(reason=f"the central now runs {welcome.run_name!r}, not {self.run_name!r}", status=1))
                return
            self.run_name = welcome.run_name
            self.on_welcome(welcome.run_name)
            backoff = BACKOFF_FIRST_S
            self._lost.clear()
            link = Link(conn, name="central", on_message=self._on_message, on_lost=self._on_lost,
                        heartbeat_s=self.faults.heartbeat_s, dead_after_s=self.faults.dead_after_s)
            self.submit(CentralUp(run_name=welcome.run_name, mode=welcome.mode))
            with self._lock:
                self._link = link
                if self._status is not None:
                    link.post(self._status)
                for msg in self._held:
                    link.post(msg)
                self._held.clear()
                for update in [*self._retained.values(), *self._unacked.values()]:
                    link.post(update)
            link.start()
            if joined:
                self.events.emit("central_rejoined")
            joined = True
            while not self._lost.wait(0.5):
                if self._closed:  # a close that came between our clear() and this wait
                    link.close()
                    break
            with self._lock:
                self._link = None
            if self._closed:
                return
            reason = link.lost_reason
            log.warning("%s: lost the central (%s); trying again for %.0f s", self.name, reason,
                        self.faults.central_grace_s)
            self.submit(CentralDown(detail=str(reason)))
            deadline = time.monotonic() + self.faults.central_grace_s

    def _on_message(self, link: Link, msg: m.Message) -> None:
        if isinstance(msg, m.ErrorNotice):
            self.events.emit("central_error", kind=msg.kind, detail=msg.detail[:200])
            link.close(drain=False)
            return
        self.submit(CentralMessage(msg))

    def _on_lost(self, link: Link, exc: Exception) -> None:
        self.events.emit("central_link_lost", detail=str(exc)[:200], error=type(exc).__name__)
        self._lost.set()
