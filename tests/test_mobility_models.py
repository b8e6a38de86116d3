"""Mobility models: trace files (time- or round-based), the seeded random-waypoint model
over a grid of edge cells, and time-based moves landing at the next step boundary."""

from __future__ import annotations

import pytest

from common.config import Move, build_config
from common.errors import ConfigError
from common.mobility_models import RoundMove, TimedMove, TraceError, grid_shape, read_trace, waypoint_trace
from device.moves import MoveSources, ScheduledMoves, TimedMoves
from tests.test_config import local_raw


def test_read_trace_in_both_formats_and_errors_name_the_line(tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("time_s,device,edge\n# a comment\n1.5,device1,edge2\n0,device2,edge1\n")
    assert read_trace(str(a)) == [TimedMove(1.5, "device1", "edge2"), TimedMove(0.0, "device2", "edge1")]
    b = tmp_path / "b.csv"
    b.write_text("round,at,device,edge\n2,0.5,device1,edge2\n")
    assert read_trace(str(b)) == [RoundMove(2, 0.5, "device1", "edge2")]
    for text, where in [("x,y\n", "header"), ("time_s,device,edge\n-1,d,e\n", "line 2"),
                        ("round,at,device,edge\n1,1.5,d,e\n", "line 2"), ("time_s,device,edge\n1,d\n", "line 2")]:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(TraceError, match=where):
            read_trace(str(bad))


def _with_mobility(mobility: dict) -> dict:
    raw = local_raw()
    raw["mobility"] = mobility
    return raw


def test_a_trace_in_the_config(tmp_path):
    trace = tmp_path / "moves.csv"
    trace.write_text("round,at,device,edge\n3,0.5,device2,edge2\n")
    cfg = build_config(_with_mobility({"model": "trace", "trace": str(trace)}))
    assert cfg.moves == (Move("device2", "edge2", 3, 0.5),) and cfg.mobility.model == "trace"
    trace.write_text("time_s,device,edge\n4.0,device1,edge2\n2.0,device3,edge1\n")
    cfg = build_config(_with_mobility({"model": "trace", "trace": str(trace)}))
    assert cfg.timed_moves == (TimedMove(2.0, "device3", "edge1"), TimedMove(4.0, "device1", "edge2"))
    assert cfg.timed_moves_for("device1") == [TimedMove(4.0, "device1", "edge2")]
    trace.write_text("time_s,device,edge\n4.0,device9,edge2\n")
    with pytest.raises(ConfigError) as err:
        build_config(_with_mobility({"model": "trace", "trace": str(trace)}))
    assert err.value.key.startswith("mobility.trace") and "device9" in str(err.value)
    for mob, key in [({"model": "trace"}, "mobility.trace"), ({"trace": "x.csv"}, "mobility.trace"),
                     ({"waypoint": {"cell_m": 5.0}}, "mobility.waypoint"), ({"model": "levy"}, "mobility.model"),
                     ({"model": "waypoint", "waypoint": {"speed_mps": 0.0}}, "mobility.waypoint.speed_mps")]:
        with pytest.raises(ConfigError) as err:
            build_config(_with_mobility(mob))
        assert err.value.key == key, mob


def test_random_waypoint_is_seeded_and_moves_between_neighbouring_cells():
    edges = ["e1", "e2", "e3", "e4"]
    devices = {"d1": "e1", "d2": "e4"}
    kw = dict(devices=devices, edges=edges, cell_m=10.0, speed_mps=2.0, horizon_s=300.0)
    a, b = waypoint_trace(seed=1, **kw), waypoint_trace(seed=1, **kw)
    assert a == b and a != waypoint_trace(seed=2, **kw)
    assert grid_shape(4) == (2, 2)
    for dev, first in devices.items():
        mine = [mv for mv in a if mv.device == dev]
        assert len(mine) > 5
        where = [first] + [mv.to for mv in mine]
        assert all(x != y for x, y in zip(where, where[1:]))  # every move changes cell
        times = [mv.time_s for mv in mine]
        assert times == sorted(times) and times[-1] < 300.0
        # from a cell's centre, the nearest border is half a cell away: 2.5 s at 2 m/s
        assert times[0] >= 2.5 - 1e-9
    assert waypoint_trace(devices={"d1": "e1"}, edges=["e1"], cell_m=10.0, speed_mps=2.0) == []
    cfg = build_config(_with_mobility({"model": "waypoint", "waypoint": {"cell_m": 50.0, "speed_mps": 20.0}}))
    assert cfg.timed_moves and {mv.to for mv in cfg.timed_moves} <= {"edge1", "edge2"}
    assert cfg.waypoint.seed == cfg.run.seed


def test_time_based_moves_land_at_the_next_step_boundary():
    now = [100.0]
    src = TimedMoves([TimedMove(1.0, "d", "e2"), TimedMove(2.5, "d", "e3"), TimedMove(2.7, "d", "e1")],
                     clock=lambda: now[0])
    assert src.due(1, 0, 10) is None          # t = 0: the clock starts at the first boundary
    now[0] = 100.9
    assert src.due(1, 1, 10) is None
    now[0] = 101.2
    assert src.due(1, 2, 10) == "e2" and src.due(1, 2, 10) is None  # once
    now[0] = 103.0                             # two came due during one step: the last counts
    assert src.due(1, 3, 10) == "e1" and src.due(1, 3, 10) is None
    both = MoveSources(ScheduledMoves([Move("d", "e2", 1, 0.5)]), src)
    assert both.due(1, 5, 10) == "e2" and both.due(1, 5, 10) is None
