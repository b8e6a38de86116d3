"""The retry loops that were written out by hand, now ``common.limits.retry`` and
``Backoff`` (issue 24 item 4): the central's results, the supervisor's restarts, the
resolver's warm-up. Each keeps its tries and its waits; the waits are recorded, not slept."""

from __future__ import annotations

import errno
import json
import logging
import socket

import pytest

from central import results
from common import limits, resolver, supervisor
from tests.testbed import LOOPBACK

pytestmark = pytest.mark.timeout(60)


def _recording(waits: list[float]) -> type[limits.Backoff]:
    class Recording(limits.Backoff):
        def next(self) -> float:
            waits.append(super().next())
            return 0.0
    return Recording


def _failing_writes(monkeypatch, errs: list[int]) -> list[str]:
    """``write_text_atomic`` in ``central.results`` fails with each errno of ``errs`` in
    turn, then writes; returns the paths written."""
    real, written = results.write_text_atomic, []

    def write(path, text):
        if errs:
            raise OSError(errs.pop(0), "refused for the test")
        real(path, text)
        written.append(path)
    monkeypatch.setattr(results, "write_text_atomic", write)
    return written


@pytest.fixture
def waits(monkeypatch) -> list[float]:
    got: list[float] = []
    monkeypatch.setattr(results, "Backoff", _recording(got))
    return got


def test_a_write_short_of_descriptors_is_tried_again_with_the_waits_it_always_had(tmp_path, monkeypatch, waits):
    rr = results.RunResults(run_dir=str(tmp_path), header={"run_name": "r"})
    written = _failing_writes(monkeypatch, [errno.EMFILE] * 3)
    rr.write()
    assert waits == [0.05, 0.1, 0.2] and len(written) == 2
    assert json.loads((tmp_path / results.SUMMARY).read_text())["run_name"] == "r"


def test_a_round_s_write_gives_up_after_its_tries_and_the_run_goes_on(tmp_path, monkeypatch, waits, caplog):
    rr = results.RunResults(run_dir=str(tmp_path), header={})
    _failing_writes(monkeypatch, [errno.EMFILE] * results.WRITE_TRIES)
    with caplog.at_level(logging.WARNING, logger="central"):
        rr.write()
    assert waits == [0.05, 0.1, 0.2, 0.4]  # none after the last try
    assert "not written this round" in caplog.text and not (tmp_path / results.SUMMARY).exists()


def test_the_final_write_waits_about_a_minute_then_raises(tmp_path, monkeypatch, waits):
    rr = results.RunResults(run_dir=str(tmp_path), header={})
    _failing_writes(monkeypatch, [errno.EMFILE] * results.WRITE_TRIES_FINAL)
    with pytest.raises(OSError) as got:
        rr.write(final=True)
    assert got.value.errno == errno.EMFILE
    assert waits == [min(1.0, 0.05 * 2 ** i) for i in range(results.WRITE_TRIES_FINAL - 1)]


@pytest.mark.parametrize("final", [False, True])
def test_a_full_disk_is_not_waited_for_beyond_the_round_s_tries(tmp_path, monkeypatch, waits, final):
    rr = results.RunResults(run_dir=str(tmp_path), header={})
    _failing_writes(monkeypatch, [errno.ENOSPC] * results.WRITE_TRIES_FINAL)
    with pytest.raises(OSError) as got:
        rr.write(final=final)
    assert got.value.errno == errno.ENOSPC and len(waits) == results.WRITE_TRIES - 1


def test_a_child_s_restarts_wait_as_they_always_did():
    c = supervisor.Child(name="edge1", role="edge", argv=lambda resume: [], log_dir=None)
    assert [c.backoff.next() for _ in range(6)] == [min(2.0, 0.2 * 2 ** n) for n in range(6)]


def test_warm_tries_a_lost_name_again_with_doubling_pauses(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(resolver, "Backoff", _recording(waits))
    lost = {"edge1": 3, "edge2": 1}

    def lookup(host, port):
        if lost[host]:
            lost[host] -= 1
            raise socket.gaierror("lost for the test")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (LOOPBACK, port))]

    r = resolver.Resolver(lookup=lookup)
    r.warm([("edge1", 1), ("edge2", 2)]).join(30)
    assert r.cached("edge1", 1) and r.cached("edge2", 2) and r.lookups == 2
    assert waits == [0.1, 0.2, 0.4]


def test_warm_gives_up_at_its_deadline_on_its_own_clock(monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr(resolver, "Backoff", _recording(waits))
    now = [0.0]

    def lookup(host, port):
        now[0] += 10.0  # each try costs 10 s on the resolver's clock
        raise socket.gaierror("never")

    r = resolver.Resolver(lookup=lookup, clock=lambda: now[0])
    r.warm([("nowhere", 1)], within_s=35.0).join(30)
    assert not r.cached("nowhere", 1) and waits == [0.1, 0.2, 0.4]  # tries at 10, 20, 30, 40 s
