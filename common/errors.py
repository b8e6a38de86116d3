"""The testbed's error hierarchy.

Protocol errors split by who is at fault (as in h11): ``LocalProtocolError`` means this
process tried to do something the protocol does not allow (a bug here);
``RemoteProtocolError`` means the peer sent bytes or a message that is not allowed (the
connection to it is closed, the process goes on). ``ConnectionClosed`` is the peer going
away, which is not a protocol violation; ``TransportError`` wraps an ``OSError`` once, at
the socket layer.
"""

from __future__ import annotations


class TestbedError(Exception):
    """Base of every error the testbed raises on purpose."""

    __test__ = False  # not a pytest test class, whatever its name says


class ConfigError(TestbedError):
    """A testbed file or override is wrong. ``key`` names the setting, ``fix`` says what to do."""

    def __init__(self, key: str, problem: str, fix: str = "") -> None:
        self.key = key
        self.problem = problem
        self.fix = fix
        text = f"config key '{key}': {problem}"
        if fix:
            text += f" (fix: {fix})"
        super().__init__(text)


class ProtocolError(TestbedError):
    """Something on the wire broke the protocol."""


class LocalProtocolError(ProtocolError):
    """We tried to send or do something the protocol forbids: a bug on this side."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something malformed or not allowed now: we close that connection."""


class FrameTooLarge(RemoteProtocolError):
    """A frame's payload is over what its link takes (refused from its prefix, before any
    of it is read or allocated)."""


class AuthenticationError(RemoteProtocolError):
    """The peer could not prove that it holds the testbed's shared key."""


class TransportError(TestbedError):
    """The socket failed (an ``OSError`` underneath, chained as ``__cause__``)."""


class ConnectionClosed(TransportError):
    """The peer closed the connection (cleanly, at a frame boundary, or not)."""


class PeerSilent(ConnectionClosed):
    """The peer said nothing (not even a heartbeat) within its deadline, or took none of
    our bytes: it is treated as gone, like a closed connection."""


class MigrationError(TestbedError):
    """A session could not be moved between edges; nothing was installed or dropped."""
