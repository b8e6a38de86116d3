"""What the central records of an edge's reports (issue 24 item 4: no site spells out a
``FaultReport``'s fields): every field the message has, as it came, with who delivered it."""

from __future__ import annotations

import dataclasses

from central.edges import EdgeMessage
from common import messages as m
from tests.test_rounds import FakeEdges, config, server


def test_a_fault_report_is_recorded_with_every_field_it_has_and_its_delivery():
    cfg = config()
    srv = server(cfg, FakeEdges(cfg.device_names))
    rep = m.FaultReport(kind="link_lost", process="device1", peer="edge1", round=2, step=3, down_s=0.5,
                        recovery="pulled", delivered_by="device device1")
    srv._handle(EdgeMessage("edge1", rep))
    (rec,) = srv.results.summary["faults"]
    fields = {f.name for f in dataclasses.fields(m.FaultReport)}
    assert set(rec) == fields | {"at_s", "via"}
    assert {k: rec[k] for k in fields} == dataclasses.asdict(rep)  # the defaults too
    assert rec["via"] == "edge1"
    srv._handle(EdgeMessage("edge1", dataclasses.replace(rep, delivered_by="")))
    assert srv.results.summary["faults"][1]["delivered_by"] == "edge edge1"  # the edge's own report
