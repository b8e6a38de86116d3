"""A hostile device against real processes (issue 26): the test plays device2 with its own
legitimate certificate and the project's message classes, against a central, an edge and
an honest device1 started one by one on loopback, in the TLS mode.

Each attack comes on a link of its own (the edge closes a link that breaks the bounds):
a batch of far more rows than the round's, of the wrong shape, of the wrong dtype, with a
NaN, with a label out of range; a ``FaultReport`` naming the central, one naming another
edge, a ``MigrationReport`` about device1; a report with ANSI escapes, CR and BEL in every
text field; a burst of 3,000 reports. Then device2 goes, and the run must end with
device1's update in every round (device2 none: it never finished a round), each
refusal recorded as device2's fault, nothing forged in the results, the burst cut to the
link's budget, and nothing of the escapes on the central's output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from common import messages as m
from common import transport
from common.config import load_config
from common.errors import ConnectionClosed, RemoteProtocolError
from common.security import Identity
from edge import reports
from tests.testbed import Testbed, write_config

pytestmark = [pytest.mark.process, pytest.mark.timeout(900)]
WAIT = 60.0
START_S = 300.0  # the roles start one by one, each loading torch: slow on a loaded machine
EVIL = "\x1b[2J\x1b[H\rround 5/5  acc 1.000\x07\n"
BATCH = 20
DEVICE2 = Identity("device", "device2")
EDGE1 = Identity("edge", "edge1")


class Hostile:
    """device2, one link per attack."""

    def __init__(self, cfg: Path) -> None:
        self.c = load_config(str(cfg))
        self.creds = self.c.credentials(DEVICE2)
        self.port = self.c.edges["edge1"].port
        self.plan: dict | None = None

    def attach(self) -> transport.Connection:
        conn = transport.connect("127.0.0.1", self.port, creds=self.creds, expect=EDGE1, peer="edge1", timeout=WAIT,
                                 retry_for=START_S)
        conn.send(m.AttachRequest(device="device2", kind="join", round=0, step=0, source="", last_round=0,
                                  why="start"))
        reply = self._next(conn, m.AttachReply)
        assert reply.ok, reply
        return conn

    def round_work(self, conn: transport.Connection) -> m.DeviceRound:
        work = self._next(conn, m.DeviceRound)
        self.plan = work.plan
        return work

    @staticmethod
    def _next(conn: transport.Connection, kind: type) -> m.Message:
        while True:
            msg = conn.recv(timeout=WAIT)
            if isinstance(msg, kind):
                return msg
            assert isinstance(msg, (m.Heartbeat, m.AttachReply, m.DeviceRound)), msg

    @staticmethod
    def refusal(conn: transport.Connection) -> str:
        """The edge's ``ErrorNotice`` on this link, then its end."""
        try:
            while True:
                msg = conn.recv(timeout=WAIT)
                if isinstance(msg, m.ErrorNotice):
                    break
                assert isinstance(msg, (m.Heartbeat, m.DeviceRound, m.AttachReply)), msg
            with pytest.raises((ConnectionClosed, RemoteProtocolError)):
                while True:
                    conn.recv(timeout=WAIT)
            return msg.detail
        finally:
            conn.close()


def _batch(rows: int, *, shape=(64, 8, 8), dtype=torch.float32, label: int = 3, poison: float | None = None):
    x = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(rows)).to(dtype)
    if poison is not None:
        x.view(-1)[rows] = poison
    return {"x": x, "y": torch.full((rows,), label, dtype=torch.int64)}


def _fault(**kw) -> m.FaultReport:
    base = dict(kind="link_lost", process="device2", peer="edge1", round=1, step=0, detail="reset", detected_s=0.0,
                down_s=0.1, replayed=0, recovery="here", samples_lost=0)
    return m.FaultReport(**{**base, **kw})


BATCHES = {
    # over what the link takes (``device_payload_limit``): refused from the frame's prefix
    "oversized": (_batch(100 * BATCH), "exceeds"),
    "a row too many": (_batch(BATCH + 1), "21 rows, the round's batches have 1..20"),
    "shape": (_batch(BATCH, shape=(64, 8, 9)), "the cut's are torch.float32 [n, 64, 8, 8]"),
    "dtype": (_batch(BATCH, dtype=torch.float64), "activations are torch.float64"),
    "nan": (_batch(BATCH, poison=float("nan")), "not finite"),
    "labels": (_batch(BATCH, label=10), "labels outside 0..9"),
}
FORGED = {
    "fault of the central": (_fault(process="central", peer="edge1", samples_lost=10 ** 12), "speaks for 'central'"),
    "fault of another edge": (_fault(process="edge1", peer="edge1", kind="edge_lost"), "speaks for 'edge1'"),
    "move of device1": (m.MigrationReport(device="device1", source="edge1", target="edge1", round=1, step=0,
                                          mode="fedfly", pause_ms=1e12, state_bytes=1, transfer_ms=1.0),
                        "speaks for 'device1'"),
}


def test_a_hostile_device_costs_only_its_own_links_and_is_recorded_as_what_it_is(tmp_path):
    # device_grace_s: room for device2's attaches one after another (each within a few ms
    # of the last link's close), and what round 1 waits once its last link is closed
    cfg = write_config(tmp_path, edges=1, devices=2, rounds=2, samples_per_device=400, batch_size=BATCH,
                       extra={"security": {"mode": "tls", "certs": "certs"},
                              "faults": {"device_grace_s": 3.0}})
    from scripts import certs as certs_cmd
    assert certs_cmd.main(["--config", str(cfg)]) == 0
    bed = Testbed(cfg, "devices.device1.slowdown=3", log_dir=tmp_path / "logs")
    refusals: dict[str, str] = {}
    try:
        bed.start("central")
        bed.start("edge", "edge1")
        bed.start("device", "device1")
        hostile = Hostile(cfg)
        conn = hostile.attach()
        hostile.round_work(conn)  # round 1 started: device2 takes part
        conn.close()
        for what, (batch, _) in BATCHES.items():
            conn = hostile.attach()
            r = hostile.round_work(conn).round_plan.round
            try:
                conn.send(m.Activations(round=r, step=0, batch=batch))
                refusals[what] = hostile.refusal(conn)
            except (ConnectionClosed, RemoteProtocolError) as exc:  # closed before it was all sent
                conn.close()
                refusals[what] = f"closed: {exc}"
        for what, (msg, _) in FORGED.items():
            conn = hostile.attach()
            conn.send(msg)
            refusals[what] = hostile.refusal(conn)
        conn = hostile.attach()
        r = hostile.round_work(conn).round_plan.round
        conn.send(_fault(process="device2", detail=EVIL, recovery=EVIL))  # its own, with a terminal's worst
        for i in range(3000):
            conn.send(_fault(step=i % 7, detail="burst"))
        conn.send(m.Activations(round=r, step=0, batch=_batch(BATCH)))  # the link still serves
        answer = Hostile._next(conn, m.Gradients)
        assert answer.step == 0 and answer.grad["g"].shape == (BATCH, 64, 8, 8)
        conn.close()  # device2 is gone: the round goes on without it after faults.device_grace_s
        codes = bed.wait_all(START_S)
    finally:
        bed.stop()
    assert codes == {"central": 0, "edge1": 0, "device1": 0}, {n: bed.log(n)[-2000:] for n in codes}
    for what, (_, why) in {**BATCHES, **FORGED}.items():
        assert why in refusals[what] or what == "oversized", (what, refusals[what])
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "summary.json").exists()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "finished"
    # the honest device was served throughout
    assert [r["devices"] for r in summary["rounds"]] == [["device1"], ["device1"]]
    faults = summary["faults"]
    refused = [f for f in faults if f["kind"] == "protocol_error"]
    assert len(refused) == len(BATCHES) + len(FORGED)
    for what, (_, why) in {**BATCHES, **FORGED}.items():
        assert [f for f in refused if why in f["detail"]], (what, refused)
    assert all(f["peer"] == "device2" and f["process"] == "edge1" and f["delivered_by"] == "edge edge1"
               and f["via"] == "edge1" for f in refused)
    # nothing forged reached the results: every fault device2's link delivered speaks for device2
    theirs = [f for f in faults if f.get("delivered_by") == "device device2"]
    assert theirs and all(f["process"] == "device2" and f["via"] == "edge1" for f in theirs)
    assert not any(f.get("samples_lost", 0) >= 10 ** 12 or f["kind"] == "edge_lost" for f in faults)
    assert summary["migrations"] == []
    # the burst: the link's budget, not 3,000 lines (the burst plus what its rate refilled
    # while the edge read it: a few seconds' worth, far below a tenth of the burst)
    assert reports.REPORT_BURST <= len(theirs) < 300
    edge_events = [json.loads(line) for f in run.glob("events-edge1*.jsonl") for line in f.read_text().splitlines()]
    assert [e for e in edge_events if e["event"] == "reports_dropped"]
    # the escapes: recorded and printed escaped, never raw
    (evil,) = [f for f in theirs if f["detail"] != "burst"]
    assert evil["detail"].startswith("\\x1b[2J\\x1b[H\\rround 5/5") and evil["recovery"] == evil["detail"]
    out = bed.log("central")
    assert "\\x1b[2J" in out
    assert not any(c in out for c in "\x1b\x07\r"), "a raw escape reached the central's output"
    assert not [line for line in out.splitlines() if line.startswith("round 5/5")]
