"""The run report (``python -m scripts.plot RUN_DIR``): a run folder written by hand in the
real format (summary.json and events files, as central/results.py and common/events.py
write them) with a move, a dropped link, a killed edge, a killed and restarted device, and
a torn last line; the timeline read from it, the figures and the HTML page."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest

from scripts.timeline import marks_per_round, read_timeline

T0 = 1_800_000_000.0  # the wall clock of round 1's start
HOSTILE = '<img src="http://example.invalid/x.png"> & <script>alert(1)</script>'


def _line(process: str, role: str, t: float, event: str, **fields) -> str:
    rec = {"ts": T0 + t, "process": process, "role": role, "event": event, "cpu_percent": 1.0, "rss_mb": 100.0,
           **fields}
    return json.dumps(rec) + "\n"


def _summary() -> dict:
    rounds = [{"round": r, "seconds": 10.0, "eval_seconds": 0.5, "test_accuracy": 0.1 * r, "test_loss": 2.0 - 0.1 * r,
               "samples": 400, "devices": ["device1", "device2", "device3"], "missing": [], "dropped": [],
               "samples_lost": 0} for r in (1, 2, 3)]
    return {
        "run_name": "hand", "mode": "fedfly", "model": "vgg5", "dataset": "synthetic", "distribution": "balanced",
        "strategy": {"name": "fedavg"}, "edges": ["edge1", "edge2"], "training": {"rounds": 3}, "status": "finished",
        "rounds": rounds,
        "devices": {d: {"samples": 200, "round_seconds": [4.0, 5.0, 6.0], "steps": [8] * 3, "edges": ["edge1"] * 3}
                    for d in ("device1", "device2", "device3")},
        "migrations": [{"device": "device1", "from": "edge1", "to": "edge2", "round": 1, "step": 4, "mode": "fedfly",
                        "pause_ms": 25.0, "state_bytes": 4_500_000, "transfer_ms": 30.0}],
        "faults": [{"at_s": 9.0, "kind": "link_lost", "process": "device2", "peer": "edge1", "round": 2, "step": 3,
                    "detail": HOSTILE, "detected_s": 0.0, "down_s": 1.5, "replayed": 1, "recovery": "here",
                    "samples_lost": 0}],
        "failures": [], "final_model_sha256": "ab" * 32, "total_seconds": 33.0,
    }


def _run_folder(tmp: Path) -> Path:
    run = tmp / "run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps(_summary()))
    c = [_line("central", "central", -5.0, "listening", host="127.0.0.1", port=1, run="hand")]
    for r in (1, 2, 3):
        c.append(_line("central", "central", 10.0 * (r - 1), "round_start", round=r, participants=["device1"]))
        c.append(_line("central", "central", 10.0 * r - 0.1, "round_done", round=r, seconds=9.9))
    # the central's fault lines carry the reporter's name in ``process``
    c.insert(4, _line("device2", "central", 13.6, "fault", kind="link_lost", peer="edge1", detail=HOSTILE))
    c.insert(5, _line("central", "central", 22.5, "fault", kind="device_dropped", peer="device3", round=3,
                      detail="attached to no edge for 0.5 s", samples_lost=200))
    c.insert(6, _line("central", "central", 24.0, "fault", kind="edge_lost", peer="edge2", detail="reset"))
    c.append(_line("central", "central", 30.0, "finished", status="finished"))
    files = {
        "central": c,
        # as a real edge does, it says it lost the central after its goodbye: it did not die
        "edge1": [_line("edge1", "edge", -3.0, "listening"), _line("edge1", "edge", 30.1, "shutdown", reason="done"),
                  _line("edge1", "edge", 30.1, "central_link_lost", detail="central closed the connection")],
        # edge2 is killed at second 24: its last line is earlier, the central sees it go at 24
        "edge2": [_line("edge2", "edge", -3.0, "listening"), _line("edge2", "edge", 21.0, "round_start", round=3)],
        "device1": [_line("device1", "device", -1.0, "attached", edge="edge1", home="edge1", action="wait", how="join"),
                    _line("device1", "device", 0.1, "round_start", round=1, steps=8, edge="edge1", step=0),
                    _line("device1", "device", 5.025, "moved", source="edge1", to="edge2", round=1, step=4,
                          pause_ms=25.0, state_bytes=4_500_000, transfer_ms=30.0, resume_step=4, how="pulled"),
                    # as in mode restart: the move costs the steps done so far
                    _line("device1", "device", 5.03, "rollback", round=1, step=4, to=0, how="restart"),
                    _line("device1", "device", 8.0, "round_done", round=1, steps=8, train_seconds=7.9),
                    # round 2 is over before its update is delivered: that training is not used
                    _line("device1", "device", 10.2, "round_start", round=2, steps=8, edge="edge2", step=0),
                    _line("device1", "device", 14.0, "round_over", round=2, step=3, delivered=False, reason="over"),
                    _line("device1", "device", 20.5, "move_failed", to="edge1", round=3, step=0, reason="refused"),
                    _line("device1", "device", 30.2, "shutdown", reason="run finished")],
        "device2": [_line("device2", "device", -1.0, "attached", edge="edge1", home="edge1", action="wait", how="join"),
                    _line("device2", "device", 10.1, "round_start", round=2, steps=8, edge="edge1", step=0),
                    _line("device2", "device", 12.0, "cut", seconds=1.5, to="", edge="edge1", by="trace"),
                    _line("device2", "device", 12.01, "link_lost", edge="edge1", detail=HOSTILE, silent_s=0.0, cut=True,
                          round=2, step=3),
                    _line("device2", "device", 13.5, "reattached", edge="edge1", source="edge1", action="continue",
                          resume_step=2, how="here", down_s=1.5),
                    _line("device2", "device", 13.51, "rollback", round=2, step=3, to=2, how="here"),
                    _line("device2", "device", 18.0, "round_done", round=2, steps=8, train_seconds=7.9),
                    _line("device2", "device", 30.2, "shutdown", reason="run finished")],
        # device3 is killed in round 3 (edge1 sees it go), started again, and resumes from its disk
        "device3": [_line("device3", "device", -1.0, "attached", edge="edge1", home="edge1", action="wait", how="join"),
                    _line("device3", "device", 20.1, "round_start", round=3, steps=8, edge="edge1", step=0)],
        "device3.1": [_line("device3", "device", 23.0, "data_loaded", samples=200),
                      _line("device3", "device", 23.5, "resumed_from_disk", round=3, step=4, resume_step=4, how="here"),
                      _line("device3", "device", 23.5, "attached", edge="edge1", home="edge1", action="continue",
                            how="here"),
                      _line("device3", "device", 23.6, "round_start", round=3, steps=8, edge="edge1", step=4),
                      _line("device3", "device", 28.0, "round_done", round=3, steps=8, train_seconds=4.5),
                      _line("device3", "device", 30.2, "shutdown", reason="run finished")],
    }
    files["edge1"].insert(1, _line("edge1", "edge", 22.0, "detached", device="device3", state="active"))
    for name, lines in files.items():
        (run / f"events-{name}.jsonl").write_text("".join(lines))
    with open(run / "events-device3.jsonl", "a") as f:
        f.write('{"ts": 1800000020.5, "process": "devi')  # torn by the kill
    return run


def test_the_timeline_reads_where_each_device_was_and_what_happened(tmp_path):
    t = read_timeline(_run_folder(tmp_path))
    assert [r.name for r in t.rows] == ["central", "edge1", "edge2", "device1", "device2", "device3"]
    assert [(r, round(a, 2), round(b, 2)) for r, a, b in t.rounds] == [(1, 0, 9.9), (2, 10, 19.9), (3, 20, 29.9)]
    rows = {r.name: r for r in t.rows}
    d1 = rows["device1"]
    assert [(round(s.start, 3), round(s.end, 3), s.edge) for s in d1.on] == [(-1, 5, "edge1"), (5.025, 30.2, "edge2")]
    assert [(round(s.start, 3), round(s.end, 3), s.edge) for s in d1.training] == [(0.1, 5, "edge1"),
                                                                                  (5.025, 8, "edge2")]
    move, failed = d1.marks
    assert failed.kind == "move" and failed.t == pytest.approx(20.5) and failed.text == "move to edge1 failed: refused"
    assert move.kind == "move" and move.pause_s == pytest.approx(0.025) and move.t == pytest.approx(5.0)
    assert move.text.endswith("4 steps again")
    assert [(round(s.start, 3), round(s.end, 3), s.edge) for s in d1.unused] == [(10.2, 14, "edge2")]
    d2 = rows["device2"]
    assert [(round(s.start, 3), round(s.end, 3)) for s in d2.down] == [(12, 13.5)]  # from the cut, not its report
    assert [(mk.kind, round(mk.t, 3)) for mk in d2.marks] == [("drop", 12), ("recovery", 13.5)]
    assert d2.marks[1].pause_s == pytest.approx(1.5) and d2.marks[1].text.endswith("1 step again")
    # edge2 died where the central saw it go, not at its last line; edge1 said goodbye
    assert [(mk.kind, mk.t) for mk in rows["edge2"].marks] == [("kill", pytest.approx(24.0))]
    assert rows["edge1"].marks == () and rows["central"].marks == ()
    # device3: killed (edge1 saw it go at 22), out of its round (the central said), started
    # again at 23, resumed from its disk
    assert [(mk.kind, round(mk.t, 3)) for mk in rows["device3"].marks] == [("kill", 22), ("drop", 22.5),
                                                                           ("restart", 23), ("recovery", 23.5)]
    assert "left round 3 (200 samples lost)" in rows["device3"].marks[1].text
    # each mark counts for the round it fell in
    assert marks_per_round(t, _summary()) == {1: {"move": 1}, 2: {"drop": 1, "recovery": 1},
                                              3: {"move": 1, "kill": 2, "drop": 1, "restart": 1, "recovery": 1}}
    assert marks_per_round(None, _summary()) == {1: {"move": 1}}  # no events: the summary's migrations
    # while a run is going, a last life without a goodbye died only if a peer saw it go
    going = {r.name: r for r in read_timeline(tmp_path / "run", finished=False).rows}
    assert [mk.kind for mk in going["edge2"].marks] == ["kill"]
    (tmp_path / "run" / "events-central.jsonl").write_text(
        "".join(line for line in (tmp_path / "run" / "events-central.jsonl").read_text().splitlines(True)
                if "edge_lost" not in line))
    going = {r.name: r for r in read_timeline(tmp_path / "run", finished=False).rows}
    assert going["edge2"].marks == ()
    assert [mk.kind for mk in read_timeline(tmp_path / "run").rows[2].marks] == ["kill"]  # its last line


@pytest.fixture
def matplotlib_available():
    pytest.importorskip("matplotlib", reason="matplotlib is the optional 'plot' extra; pip install -e '.[plot]'")


def _round_axes(fig) -> list:
    return [ax for ax in fig.axes if ax.get_xlabel() == "round"]


def test_plot_of_a_run_folder_writes_the_figures_and_a_self_contained_page(tmp_path, matplotlib_available, capsys):
    from scripts import plot
    run = _run_folder(tmp_path)
    # a run's name is text in a figure (not TeX, which would fail on this one) and on the page
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "run_name": "r$^{$<b>"}))
    assert plot.main([str(run)]) == 0
    for name in ("accuracy.png", "round_times.png", "run.png", "timeline.png"):
        assert (run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (run / name).stat().st_size > 5000, name
    assert str(run / "report.html") in capsys.readouterr().out
    page = (run / "report.html").read_text(encoding="utf-8")
    # nothing outside the page: the one image is a data URI of the PNG that run.png holds
    (src,) = re.findall(r'src="([^"]*)"', page)
    assert src.startswith("data:image/png;base64,")
    assert base64.b64decode(src.split(",", 1)[1]) == (run / "run.png").read_bytes()
    # (the address in the hostile text is there as text, escaped: no attribute or tag refers to it)
    assert not re.search(r"<(script|link|iframe|object|embed|a)\b|href=|url\(|=\s*\"?https?:", page)
    # text from the run is escaped
    assert HOSTILE not in page and html_escaped(HOSTILE) in page
    assert "r$^{$<b>" not in page and "r$^{$&lt;b&gt;" in page
    # the key numbers
    for text in ("final test accuracy", "0.3000", "ab" * 32, "25.0 ms", "30.0 ms", "4.50 MB", "fedfly", "vgg5"):
        assert text in page, text
    numbers = dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", page))
    assert numbers["migrations"] == "1" and numbers["link drops"] == "2" and numbers["processes killed / lost"] == "2"
    assert numbers["recoveries"] == "2"


def html_escaped(text: str) -> str:
    import html
    return html.escape(text)


def test_round_axes_have_whole_rounds_and_every_kind_of_mark_is_drawn(tmp_path, matplotlib_available):
    from scripts import report
    summary, timeline = report.load_run(_run_folder(tmp_path))
    fig = report.run_figure(summary, timeline)
    rounds_axes = _round_axes(fig)
    assert len(rounds_axes) == 2
    for ax in rounds_axes:
        assert list(ax.get_xticks()) == [1, 2, 3]
    acc, times = rounds_axes
    labels = set(times.get_legend_handles_labels()[1])
    assert {"round with a move", "round with a link drop", "round with a process lost", "round with a restart",
            "round with a recovery"} <= labels
    (tl,) = [ax for ax in fig.axes if ax.get_xlabel().startswith("seconds")]
    legend = {t.get_text() for t in tl.get_legend().get_texts()}
    assert {"move (label: pause)", "link dropped / left the round", "process killed / lost", "process started again",
            "recovered (label: time down)", "link down", "training not used (round over)", "on edge1 (thick: training)",
            "on edge2 (thick: training)"} <= legend
    notes = {t.get_text() for t in tl.texts}
    assert {"25 ms", "1.50 s"} <= notes  # the move's pause, the drop's time down
    assert [t.get_text() for t in tl.get_yticklabels()] == ["device3", "device2", "device1", "edge2", "edge1",
                                                           "central"]


def test_the_round_figures_of_plot_have_whole_rounds(tmp_path, matplotlib_available, monkeypatch):
    """accuracy.png and round_times.png, for one run and for a folder of runs."""
    from scripts import plot
    figs = []
    save = plot._save
    monkeypatch.setattr(plot, "_save", lambda fig, path, written: (figs.append(fig), save(fig, path, written)))
    run = _run_folder(tmp_path)
    plot.plot(run, tmp_path / "one")
    plot.plot(tmp_path, tmp_path / "many")
    assert len(figs) == 4
    for fig in figs:
        (ax,) = _round_axes(fig)
        assert list(ax.get_xticks()) == [1, 2, 3]
    labels = set(figs[1].axes[0].get_legend_handles_labels()[1])
    assert {"round with a move", "round with a link drop", "round with a process lost",
            "round with a recovery"} <= labels


def test_a_central_killed_and_resumed_is_one_row_with_its_death_and_its_restart(tmp_path):
    """events-central.jsonl, then events-central.1.jsonl: the round it ran again counts from
    its last start; the death is where an edge saw the central go."""
    c0 = [_line("central", "central", -5.0, "listening"), _line("central", "central", 0.0, "round_start", round=1),
          _line("central", "central", 9.9, "round_done", round=1),
          _line("central", "central", 10.0, "round_start", round=2),
          _line("central", "central", 12.0, "fault", kind="peer_silent", peer="device1")]
    c1 = [_line("central", "central", 15.0, "listening"), _line("central", "central", 16.0, "round_start", round=2),
          _line("central", "central", 25.0, "round_done", round=2), _line("central", "central", 25.1, "finished")]
    edge = [_line("edge1", "edge", -3.0, "listening"), _line("edge1", "edge", 13.0, "central_link_lost", detail="x"),
            _line("edge1", "edge", 25.2, "shutdown", reason="run finished")]
    for name, lines in (("central", c0), ("central.1", c1), ("edge1", edge)):
        (tmp_path / f"events-{name}.jsonl").write_text("".join(lines))
    t = read_timeline(tmp_path)
    assert [(r, round(a, 3), round(b, 3)) for r, a, b in t.rounds] == [(1, 0, 9.9), (2, 16, 25)]
    central, edge1 = t.rows
    assert [(mk.kind, round(mk.t, 3)) for mk in central.marks] == [("kill", 13), ("restart", 15)]
    assert [(round(s.start, 3), round(s.end, 3)) for s in central.on] == [(-5, 13), (15, 25.1)]
    assert edge1.marks == ()
