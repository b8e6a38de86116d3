"""devices.NAME.slowdown_rounds: a device slowed only in the rounds listed (empty: all)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from common.config import build_config, load_config
from device.client import DeviceClient
from tests.test_config import LOCAL, _set, assert_names, config_error, local_raw


def test_the_default_slows_every_round_and_a_list_only_its_rounds():
    every = load_config(LOCAL, ["devices.device1.slowdown=4"], env={}).devices["device1"]
    assert every.slowdown_rounds == ()
    assert [every.slowdown_in(r) for r in (1, 2, 3)] == [4.0, 4.0, 4.0]
    some = load_config(LOCAL, ["devices.device1.slowdown=4", "devices.device1.slowdown_rounds=[3, 1, 3]"],
                       env={}).devices["device1"]
    assert some.slowdown_rounds == (1, 3)
    assert [some.slowdown_in(r) for r in (1, 2, 3)] == [4.0, 1.0, 4.0]


@pytest.mark.parametrize("value", [1, [0], [1, -2], [1.5], ["1"], "1"])
def test_a_bad_list_names_the_key_and_the_fix(value):
    exc = config_error(_set(local_raw(), "devices.device1.slowdown_rounds", value))
    assert_names(exc, "devices.device1.slowdown_rounds")
    assert "[1, 3]" in str(exc)


def test_the_device_sleeps_only_in_a_slowed_round():
    me = build_config(_set(_set(local_raw(), "devices.device1.slowdown", 3.0),
                           "devices.device1.slowdown_rounds", [2])).devices["device1"]
    client = SimpleNamespace(me=me, compute_s=0.0, throttle_s=0.0)
    DeviceClient._throttle(client, 0.01, 1)
    assert (client.compute_s, client.throttle_s) == (0.01, 0.0)
    DeviceClient._throttle(client, 0.01, 2)
    assert client.throttle_s == pytest.approx(0.02)
