"""The way into a listener: who a connection is, checked, then its link served.

Every role's listener (the central's for its edges, an edge's for its devices and peer
edges, a device's control port for the controller) takes a connection the same way: its
first message says as whom it acts (a role and a name), its certificate must allow that
(``common.security.allowed``), and the connection is then a link read on the listener's
thread until it ends. Anything else is refused the same way too: a ``protocol_error``
event, an ``ErrorNotice`` to the peer, the connection closed; the process goes on. A
peer refused for who it is is told only "refused" (a stranger learns nothing), one that
broke the protocol is told how.
"""

from __future__ import annotations

from typing import Callable, Collection, Mapping

from common import messages as m
from common import transport
from common.errors import AuthenticationError, ProtocolError, RemoteProtocolError, TransportError
from common.link import Link
from common.security import allowed

# What a peer refused for who it is, is told.
REFUSED = "refused"


def refuse(conn: transport.Connection, events, exc: Exception, *, told: str | None = None) -> None:
    """Refuse ``conn`` for ``exc``: logged (``protocol_error``), said to the peer (``told``,
    default the error's text) and closed."""
    detail = str(exc)[:200]
    events.emit("protocol_error", peer=conn.peer, detail=detail, error=type(exc).__name__)
    conn.close(notice=m.ErrorNotice(kind=type(exc).__name__, detail=detail if told is None else told))


def admit(conn: transport.Connection, events, role: str, name: str | None = None, *, why: str = "",
          told: str = REFUSED) -> bool:
    """True if ``conn``'s certificate may act as ``role`` (``name``); else refuse it and
    False. ``why``: the logged reason (default: who it is and what it may not be)."""
    if allowed(conn.identity, role, name):
        return True
    refuse(conn, events, AuthenticationError(why or f"{conn.identity} may not act as {role} {name or ''}".rstrip()),
           told=told)
    return False


class Door:
    """A listener's handler (``transport.Listener(handler=door)``). ``claims(first)`` says
    as whom a connection's first message acts (role, name), None for a message not allowed
    first; ``known[role]``, where given, holds the names that role may take (a name outside
    it is refused as not allowed); ``open(conn, first, role, name)`` wraps the admitted
    connection in a link (its writer started if it must answer before reading) and hands
    its events on; this thread then reads the link until it ends."""

    def __init__(self, *, where: str, events, first_within_s: float,
                 claims: Callable[[m.Message], tuple[str, str] | None],
                 open: Callable[[transport.Connection, m.Message, str, str], Link | None],
                 known: Mapping[str, Collection[str]] | None = None) -> None:
        self.where = where
        self.events = events
        self.first_within_s = first_within_s
        self.claims = claims
        self.open = open
        self.known = known or {}

    def __call__(self, conn: transport.Connection) -> None:
        try:
            first = conn.recv(timeout=self.first_within_s)
        except (ProtocolError, TimeoutError) as exc:  # a bad frame, or nothing said in time
            refuse(conn, self.events, exc)
            return
        except TransportError:  # gone before it said anything: nothing to tell it
            return
        who = self.claims(first)
        if who is None:
            refuse(conn, self.events, RemoteProtocolError(f"{self.where} (new connection): {first.TYPE} "
                                                          f"is not allowed first"))
            return
        role, name = who
        why = f"{conn.identity} may not send {first.TYPE} as {role} {name}"
        if role in self.known and name not in self.known[role]:
            refuse(conn, self.events, AuthenticationError(why), told=REFUSED)
            return
        if not admit(conn, self.events, role, name, why=why):
            return
        link = self.open(conn, first, role, name)
        if link is not None:
            link.serve()
