"""A device with a real certificate and bad intentions (issue 26), seen through the seams:
what an edge's core does with a batch out of the round's bounds or a report that speaks
for someone else, what a device does with a gradient out of bounds, and that no text a
peer sent reaches the central's output, its event log or ``summary.json`` unescaped.
``tests/test_hostile_device.py`` plays the same device against real processes."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import re

import pytest
import torch

from central.edges import EdgeMessage
from central.server import CentralServer
from common import messages as m
from common import security
from common.bounds import batch_problem, cut_row, gradient_problem
from common.cli import PrintableFormatter
from common.errors import RemoteProtocolError
from common.events import EventLog
from common.models import device_part
from common.text import printable, printable_fields
from edge import reports
from edge.ports import DeviceMessage
from tests.seams import HeldTrainer, attach, batch, make_core, of, start_round
from tests.test_rounds import config

# A terminal's worst: clear the screen, home the cursor, a CR to overwrite the line, a
# bell, a newline that starts a forged line, a right-to-left override, a lone backslash.
EVIL = "\x1b[2J\x1b[H\rround 5/5  acc 1.000\x07\n  fault: none\u202e\\"
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e]")


# -- common.text ---------------------------------------------------------------------------

def test_printable_keeps_honest_text_and_escapes_the_rest_on_one_line():
    assert printable("device1 -> edge2  round 3 step 7 (link lost)") == "device1 -> edge2  round 3 step 7 (link lost)"
    out = printable(EVIL)
    assert out.isascii() and out.isprintable() and "\n" not in out and "\r" not in out
    assert out.startswith("\\x1b[2J\\x1b[H\\rround") and out.endswith("\\u202e\\")
    assert printable(out) == out  # escaped once, whatever layers it goes through
    assert printable(b"\x00ab\xff") == "\\x00ab\\xff"
    assert printable("x" * 10, limit=4) == "xxxx..." and printable("\x1b" * 3, limit=5) == "\\x1b..."
    assert printable_fields({"a\x1b": ["\r", 1, 2.5, None, True, {"k": "\x07"}]}) == \
        {"a\\x1b": ["\\r", 1, 2.5, None, True, {"k": "\\x07"}]}


def test_log_lines_escape_what_they_quote(tmp_path):
    rec = logging.LogRecord("edge", logging.WARNING, __file__, 1, "refused %s: %s", ("device1", EVIL), None)
    line = PrintableFormatter("%(levelname)s %(message)s").format(rec)
    assert not CONTROL.search(line) and "\n" not in line and line.startswith("WARNING refused device1: \\x1b[2J")
    try:
        raise ValueError(EVIL)
    except ValueError:
        import sys
        rec = logging.LogRecord("edge", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = PrintableFormatter("%(message)s").format(rec)
    assert not CONTROL.search(text) and "Traceback" in text and "\\x1b[2J" in text


def _hostile_reports() -> list[m.Message]:
    """Every string field of both reports holds ``EVIL`` (the names too: an edge that
    forwards them, or a central that records them, must escape them all)."""
    fault = m.FaultReport(kind="link_lost", process="device1" + EVIL, peer="edge1" + EVIL, round=1, step=2,
                          detail=EVIL, detected_s=0.5, down_s=1.0, replayed=1, recovery=EVIL, samples_lost=3,
                          delivered_by="device device1" + EVIL)
    move = m.MigrationReport(device="device1" + EVIL, source="edge1" + EVIL, target="edge2" + EVIL, round=1, step=2,
                             mode="fedfly" + EVIL, pause_ms=5.0, state_bytes=100, transfer_ms=1.0,
                             delivered_by=EVIL)
    return [fault, move]


def test_the_central_prints_logs_and_records_what_peers_report_escaped(tmp_path):
    """Every field a report's line prints holds ANSI escapes, CR, BEL and a newline: the
    central's output has no control character and no line it did not write, and the
    event log and ``summary.json`` hold the escaped text (also once JSON is decoded)."""
    out = io.StringIO()
    events = EventLog(process="central", role="central")
    events.open(str(tmp_path))
    srv = CentralServer(config(), creds=security.SharedKey(b"k" * 32), events=events, run_name="t",
                        run_dir=str(tmp_path / "run"), test_set=(torch.zeros(1, 3, 32, 32), torch.zeros(1, dtype=torch.int64)),
                        out=out, registry=_NoEdges())
    for msg in _hostile_reports():
        srv._handle(EdgeMessage("edge1" + EVIL, msg))
    srv.results.add_failure({"device": "device1" + EVIL, "reason": f"unknown device {EVIL}"})  # a refusal quoting a peer
    srv.results.write()
    events.close()
    printed = out.getvalue()
    assert printed.count("\n") == 2 and not CONTROL.search(printed)
    lines = printed.splitlines()
    assert lines[0].startswith("  fault: link_lost device1\\x1b[2J") and "(\\x1b[2J" in lines[0]
    assert lines[1].startswith("  move: device1\\x1b[2J")
    summary_text = (tmp_path / "run" / "summary.json").read_text()
    summary = json.loads(summary_text)
    (fault,), (move,), (failure,) = summary["faults"], summary["migrations"], summary["failures"]
    for rec in (fault, move, failure):
        for key, value in rec.items():
            assert not (isinstance(value, str) and CONTROL.search(value)), (key, value)
    assert fault["detail"] == printable(EVIL) and fault["via"] == printable("edge1" + EVIL)
    assert fault["delivered_by"] == printable("device device1" + EVIL) and move["mode"] == printable("fedfly" + EVIL)
    (log,) = tmp_path.glob("events-central*.jsonl")
    for line in log.read_text().splitlines():
        for value in printable_fields(json.loads(line)).values():
            assert not (isinstance(value, str) and CONTROL.search(value))
        assert not CONTROL.search(json.dumps(json.loads(line), ensure_ascii=False))


class _NoEdges:
    def __init__(self):
        import queue
        self.queue = queue.SimpleQueue()
        self.live: set = set()

    def send(self, edge, msg):
        return True


# -- common.bounds -------------------------------------------------------------------------

def test_the_cuts_row_shape_is_what_the_device_part_makes():
    for model, cut in (("vgg5", 3), ("vgg5", 5), ("resnet18/1x28x28/10", 2)):
        from common.nets import ModelSpec
        spec = ModelSpec.parse(model)
        out = device_part(model, cut)(torch.zeros(2, spec.channels, spec.height, spec.width))
        assert cut_row(model, cut) == (tuple(out.shape[1:]), out.dtype)


def _x(n=4, shape=(64, 8, 8), dtype=torch.float32):
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(n)).to(dtype)


def _y(n=4, value=3):
    return torch.full((n,), value, dtype=torch.int64)


def _nan(x, value=float("nan")):
    x = x.clone()
    x.view(-1)[-1] = value
    return x


BAD_BATCHES = {
    "too many rows": (_x(5), _y(5), "5 rows, the round's batches have 1..4"),
    "no rows": (_x(0), _y(0), "0 rows"),
    "wrong shape": (_x(4, (64, 8, 9)), _y(), "the cut's are torch.float32 [n, 64, 8, 8]"),
    "wrong dtype": (_x(4, dtype=torch.float64), _y(), "activations are torch.float64"),
    "nan": (_nan(_x()), _y(), "not finite"),
    "inf": (_nan(_x(), float("-inf")), _y(), "not finite"),
    "label too high": (_x(), _y(value=10), "labels outside 0..9"),
    "label negative": (_x(), _y(value=-1), "labels outside 0..9"),
}


def test_a_batch_is_in_bounds_only_with_the_rounds_rows_the_cuts_shape_finite_values_and_classes():
    assert batch_problem(_x(), _y(), model="vgg5", cut=3, batch_size=4) == ""
    assert batch_problem(_x(1), _y(1), model="vgg5", cut=3, batch_size=4) == ""  # a shard's last batch
    for what, (x, y, why) in BAD_BATCHES.items():
        assert why in batch_problem(x, y, model="vgg5", cut=3, batch_size=4), what


def test_a_gradient_is_in_bounds_only_with_the_activations_shape_and_finite_values():
    out = _x()
    assert gradient_problem(torch.zeros_like(out), out) == ""
    assert "no gradient" in gradient_problem(None, out)
    assert "gradient is torch.float32 [4, 64, 8]" in gradient_problem(torch.zeros(4, 64, 8), out)
    assert "gradient is torch.float64" in gradient_problem(torch.zeros_like(out, dtype=torch.float64), out)
    assert "not finite" in gradient_problem(_nan(torch.zeros_like(out)), out)


@pytest.mark.parametrize("what", sorted(BAD_BATCHES))
def test_a_batch_out_of_bounds_costs_its_link_as_it_arrives_and_the_other_device_goes_on(what):
    x, y, why = BAD_BATCHES[what]
    core = make_core()
    p1, p2 = attach(core), attach(core, "device2")
    start_round(core)
    core.handle(DeviceMessage(p1, "device1", m.Activations(round=1, step=0, batch={"x": x, "y": y})))
    assert p1.closed and isinstance(p1.notice, m.ErrorNotice) and why in p1.notice.detail
    assert core.entries["device1"].session.step == 0 and not of(p1, m.Gradients)  # nothing trained
    (fault,) = core.central.faults()
    assert (fault.kind, fault.process, fault.peer) == ("protocol_error", "edge1", "device1") and why in fault.detail
    core.handle(DeviceMessage(p1, "device1", batch(0)))  # the rest of that link is not heard
    assert core.entries["device1"].session.step == 0 and len(core.central.faults()) == 1
    core.handle(DeviceMessage(p2, "device2", batch(0)))
    assert [g.step for g in of(p2, m.Gradients)] == [0] and not p2.closed


def test_a_link_holds_one_batch_waiting_behind_the_one_that_trains_not_two():
    trainer = HeldTrainer()
    core = make_core(trainer=trainer)
    p = attach(core)
    start_round(core)
    core.handle(DeviceMessage(p, "device1", batch(0)))   # on the trainer
    core.handle(DeviceMessage(p, "device1", batch(1)))   # sent once the cut's gradient was out: waits, as it may
    assert not p.closed and len(core._held) == 1
    core.handle(DeviceMessage(p, "device1", batch(2)))   # a second one waiting: no honest device sends it
    assert p.closed and "a second batch before the answer to the first" in p.notice.detail
    assert len(core._held) == 1
    trainer.finish(core)
    assert core.entries["device1"].session.step == 1 and not trainer.jobs  # the one held is not trained


def test_a_device_refuses_a_gradient_out_of_bounds(tmp_path):
    from types import SimpleNamespace

    from device.client import DeviceClient, _Round

    class Link:
        def step(self, r, step, x, y):
            return m.Gradients(round=r, step=step, loss=1.0, grad={"g": _nan(torch.zeros_like(x))})

    client = DeviceClient.__new__(DeviceClient)
    client.name, client.link = "device1", Link()
    model = device_part("vgg5", 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RemoteProtocolError, match="not finite"):
        rnd = _Round(plan=SimpleNamespace(round=1), start={}, batches=[None] * 10, model=model, opt=opt, step_ms=[])
        client._split_step(rnd, torch.zeros(2, 3, 32, 32), _y(2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing applied


# -- edge.reports ----------------------------------------------------------------------------

EDGES = {"edge1", "edge2"}


def _fault(**kw) -> m.FaultReport:
    base = dict(kind="link_lost", process="device1", peer="edge2", round=1, step=3, detail="reset by peer",
                detected_s=0.0, down_s=0.4, replayed=0, recovery="pulled", samples_lost=0)
    return m.FaultReport(**{**base, **kw})


def _move(**kw) -> m.MigrationReport:
    base = dict(device="device1", source="edge2", target="edge1", round=1, step=3, mode="fedfly", pause_ms=6.0,
                state_bytes=2_000_000, transfer_ms=2.0)
    return m.MigrationReport(**{**base, **kw})


FORGED = {
    "fault of the central": (_fault(process="central", peer="edge2"), "speaks for 'central'"),
    "fault of another edge": (_fault(process="edge2", peer="edge1", kind="edge_lost"), "speaks for 'edge2'"),
    "fault of another device": (_fault(process="device2"), "speaks for 'device2'"),
    "peer not an edge": (_fault(peer="central"), "peer 'central' is not an edge"),
    "an edge's kind": (_fault(kind="handover_failed"), "kind handover_failed"),
    "samples": (_fault(samples_lost=10 ** 12), "samples_lost 1000000000000"),
    "long detail": (_fault(detail="x" * 301), "detail of 301 characters"),
    "negative wait": (_fault(down_s=-1.0), "down_s -1.0"),
    "move of another device": (_move(device="device2"), "speaks for 'device2'"),
    "move to nowhere": (_move(target="edge9"), "target 'edge9'"),
    "pause of 1e12 ms": (_move(pause_ms=1e12), "pause_ms"),
    "mode": (_move(mode="warp"), "mode 'warp'"),
    "state bytes": (_move(state_bytes=1 << 40), "state_bytes"),
}


@pytest.mark.parametrize("what", sorted(FORGED))
def test_a_report_that_does_not_speak_for_its_sender_alone_is_refused(what):
    msg, why = FORGED[what]
    with pytest.raises(reports.ReportRefused, match=re.escape(why)):
        reports.screen(msg, device="device1", edges=EDGES, by="device device1")


def test_an_honest_report_is_stamped_with_who_delivered_it_whatever_it_said():
    for msg in (_fault(), _fault(kind="restarted", peer=""), _move(), _move(source="", mode="restart")):
        out = reports.screen(dataclasses.replace(msg, delivered_by="central"), device="device1", edges=EDGES,
                             by="device device1")
        assert out.delivered_by == "device device1" and {**vars(out), "delivered_by": ""} == vars(msg)


def test_the_budget_lets_a_burst_through_then_a_rate():
    b = reports.ReportBudget(burst=3, rate=2.0, now=0.0)
    assert [b.take(0.0) for _ in range(5)] == [True, True, True, False, False] and b.dropped == 2
    assert b.take(0.5) and not b.take(0.5) and b.take(10.0) and b.take(10.0) and b.take(10.0) and not b.take(10.0)


@pytest.mark.parametrize("what", ["fault of the central", "move of another device", "pause of 1e12 ms"])
def test_the_edge_closes_the_link_of_a_forged_report_and_records_it_as_that_devices_fault(what):
    msg, why = FORGED[what]
    core = make_core()
    p = attach(core)
    start_round(core)
    core.handle(DeviceMessage(p, "device1", msg))
    assert p.closed and why in p.notice.detail
    (fault,) = core.central.faults()
    assert (fault.kind, fault.peer, fault.delivered_by) == ("protocol_error", "device1", "")  # the edge's own
    assert not [x for x in core.central.sent if isinstance(x, m.MigrationReport)]


def test_the_edge_forwards_a_burst_of_reports_within_its_links_budget_and_counts_the_rest():
    core = make_core(clock=lambda: 100.0)
    p = attach(core)
    start_round(core)
    for i in range(3000):
        core.handle(DeviceMessage(p, "device1", _fault(step=i % 5)))
    sent = core.central.faults()
    assert len(sent) == reports.REPORT_BURST and {f.delivered_by for f in sent} == {"device device1"}
    assert not p.closed
    dropped = [e for e in _emitted(core) if e[0] == "reports_dropped"]
    assert [d[1]["dropped"] for d in dropped] == [1, 1000, 2000]
    q = attach(core)  # a new link: a new budget (a move, a reconnect)
    core.handle(DeviceMessage(q, "device1", _fault()))
    core.handle(DeviceMessage(p, "device1", _fault()))  # the old link's last words spend the new one's
    assert len(core.central.faults()) == reports.REPORT_BURST + 2


def _emitted(core) -> list[tuple[str, dict]]:
    return core.events.seen


@pytest.fixture(autouse=True)
def _record_events(monkeypatch):
    """Every core's events, kept as they are emitted (``core.events.seen``)."""
    real = EventLog.emit

    def emit(self, event, **fields):
        self.__dict__.setdefault("seen", []).append((event, fields))
        real(self, event, **fields)
    monkeypatch.setattr(EventLog, "emit", emit)


@pytest.mark.parametrize("edit", ["nan", "shape", "dtype"])
def test_a_devices_part_out_of_bounds_after_its_round_costs_its_link_not_the_central_a_check(edit):
    from tests.seams import DEV_KEYS, WEIGHTS
    core = make_core()
    p = attach(core)
    start_round(core)
    weights = {k: WEIGHTS[k] for k in DEV_KEYS}
    k = DEV_KEYS[0]
    weights[k] = {"nan": _nan(weights[k]), "shape": weights[k][:1], "dtype": weights[k].double()}[edit]
    core.handle(DeviceMessage(p, "device1", m.DeviceDone(round=1, samples=8, steps=0, train_seconds=0.1,
                                                         weights=weights)))
    assert p.closed and "DeviceDone from device1 has the wrong weights" in p.notice.detail
    assert not core.central.delivered


def test_a_device_link_refuses_a_frame_over_what_an_honest_device_sends_before_reading_it():
    from common import codec
    from common.bounds import device_payload_limit
    from common.errors import FrameTooLarge
    limit = device_payload_limit("vgg5", [3], 4)
    honest = codec.encode_bytes(m.Activations(round=1, step=0, batch={"x": _x(), "y": _y()}))
    huge = codec.encode_bytes(m.Activations(round=1, step=0, batch={"x": _x(400), "y": _y(400)}))
    dec = codec.FrameDecoder()
    dec.limit_payload(limit)
    dec.receive_data(honest)
    assert isinstance(dec.next_message(), m.Activations)
    dec.receive_data(huge[:codec.PREFIX.size])  # the prefix alone says it
    with pytest.raises(FrameTooLarge, match=f"exceeds {limit}"):
        dec.next_message()


def test_a_frame_too_large_on_a_device_link_is_recorded_as_that_devices_fault():
    from common.errors import FrameTooLarge
    from edge.ports import DeviceLost
    core = make_core()
    p = attach(core)
    start_round(core)
    core.handle(DeviceLost(p, "device1", FrameTooLarge("payload of 26214464 bytes exceeds 2396224")))
    (fault,) = core.central.faults()
    assert (fault.kind, fault.peer) == ("protocol_error", "device1") and "exceeds" in fault.detail
