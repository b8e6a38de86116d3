"""Before a testbed starts: can every role bind its port? And if not, who holds it?

A launcher that starts its roles on ports another run holds would see the central fail
("Address already in use") while the edges and devices it started wait for a central
that is not theirs. ``busy_ports`` tries each listening address of the config the way
the roles bind it (``socket.create_server``: SO_REUSEADDR, so a port in TIME_WAIT is
free) and names the process that listens there (psutil), so the launcher can stop at
once with a line that says what to do.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

import psutil


@dataclass(frozen=True)
class Busy:
    role: str        # "central", "edge edge1", "device device2 (control)"
    host: str
    port: int
    error: str
    holder: str      # "pid 1234 (python -m central ...)", or "" when it cannot be seen

    def __str__(self) -> str:
        who = f"held by {self.holder}" if self.holder else "held by a process this user cannot see"
        return f"{self.role} cannot listen on {self.host}:{self.port}: {self.error}; {who}"


def listening_addresses(cfg) -> list[tuple[str, str, int]]:
    """(role, host, port) of every listener of the config's roles."""
    out = [("central", cfg.central.listen_host, cfg.central.port)]
    out += [(f"edge {n}", e.listen_host, e.port) for n, e in sorted(cfg.edges.items())]
    out += [(f"device {n} (control)", d.control.listen_host, d.control_port) for n, d in sorted(cfg.devices.items())]
    return out


def holder_of(port: int) -> str:
    """Who listens on TCP ``port`` here: "pid N (command line)", or "" if nobody visible."""
    try:
        conns = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return ""
    for c in conns:
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
            try:
                cmd = " ".join(psutil.Process(c.pid).cmdline())[:160]
            except (psutil.Error, OSError):
                cmd = "?"
            return f"pid {c.pid} ({cmd})"
    return ""


def busy_ports(cfg) -> list[Busy]:
    """The listeners of ``cfg`` that cannot bind now, each with who holds its port."""
    out = []
    for role, host, port in listening_addresses(cfg):
        try:
            sock = socket.create_server((host, port), reuse_port=False)
        except OSError as exc:
            out.append(Busy(role, host, port, exc.strerror or str(exc), holder_of(port)))
        else:
            sock.close()
    return out
