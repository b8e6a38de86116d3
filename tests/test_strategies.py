"""Aggregation strategies (pure, no network) and FedProx's proximal term on both halves
of a split model, which moves with a migrated session."""

from __future__ import annotations

import pytest
import torch

from central import checkpoint
from central.fedavg import fedavg
from central.strategies import STRATEGIES, FedAvg, FedAvgM, FedProx, make_strategy
from common import config as config_mod
from common.models import build_model, split_model, state_sha256
from common import strategies
from common.plan import Algo
from common.training import LOSS, AlgoSGD, make_optimizer
from edge.session import EdgeSession


def _ups():
    a = {"w": torch.tensor([1.0, 5.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([3.0, 1.0]), "n": torch.tensor(4)}
    return [(a, 2), (b, 6)]


def test_the_config_knows_every_strategy():
    assert set(config_mod.SECTIONS["strategy"]["name"][2].options) == set(STRATEGIES) == set(strategies.REGISTRY)


def test_fedavg_and_fedprox_aggregate_as_fedavg_and_fedprox_configures_mu():
    want = fedavg(_ups())
    for s in (FedAvg(), FedProx(mu=0.1)):
        got, state = s.aggregate(_ups(), current=None)
        assert state == {} and all(torch.equal(got[k], want[k]) for k in want)
    assert FedAvg().algo() == Algo("fedavg", {}) and FedProx(mu=0.1).algo() == Algo("fedprox", {"mu": 0.1})
    assert make_strategy({"name": "fedprox", "mu": 0.2, "server_lr": 1.0, "server_momentum": 0.9}) == FedProx(mu=0.2)


def test_fedavgm_is_fedavg_with_server_momentum():
    current = {"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(0)}
    avg = fedavg(_ups())
    # no momentum, server_lr 1: plain FedAvg
    got, _ = FedAvgM(server_lr=1.0, server_momentum=0.0).aggregate(_ups(), current=current)
    assert torch.equal(got["w"], avg["w"]) and torch.equal(got["n"], avg["n"])
    s = FedAvgM(server_lr=0.5, server_momentum=0.9)
    before = {k: v.clone() for k, v in current.items()}
    w1, st1 = s.aggregate(_ups(), current=current)
    d1 = current["w"].double() - avg["w"].double()
    assert torch.equal(w1["w"], (current["w"].double() - 0.5 * d1).float())
    assert torch.equal(w1["n"], avg["n"])  # integer tensors take FedAvg's value
    w2, st2 = s.aggregate(_ups(), current=w1, state=st1)
    v2 = 0.9 * st1["w"].double() + (w1["w"].double() - avg["w"].double())
    assert torch.equal(w2["w"], (w1["w"].double() - 0.5 * v2).float())
    assert all(torch.equal(current[k], before[k]) for k in current)  # pure: nothing changed in place
    with pytest.raises(ValueError):
        s.aggregate(_ups())


def test_strategy_state_is_checkpointed(tmp_path):
    w = build_model("vgg5", seed=0).state_dict()
    state = {"l0.conv.weight": torch.ones(32, 3, 3, 3)}
    checkpoint.save(str(tmp_path), 2, dict(w), {"rounds": []}, state)
    ck = checkpoint.load(str(tmp_path))
    assert set(ck.weights) == set(w) and torch.equal(ck.strategy_state["l0.conv.weight"], state["l0.conv.weight"])


def test_prox_mu_zero_is_plain_sgd_and_mu_pulls_towards_the_start():
    torch.manual_seed(0)
    p1 = torch.nn.Parameter(torch.randn(5))
    p2 = torch.nn.Parameter(p1.detach().clone())
    p3 = torch.nn.Parameter(p1.detach().clone())
    plain = torch.optim.SGD([p1], lr=0.1, momentum=0.9, foreach=False)
    zero = AlgoSGD([p2], lr=0.1, momentum=0.9, algo=Algo("fedprox", {"mu": 0.0}))
    prox = AlgoSGD([p3], lr=0.1, momentum=0.9, algo=Algo("fedprox", {"mu": 0.5}))
    start = p1.detach().clone()
    for _ in range(3):
        for opt, p in ((plain, p1), (zero, p2), (prox, p3)):
            opt.zero_grad()
            (p * torch.arange(5.0)).sum().backward()
            opt.step()
    assert torch.equal(p1, p2)
    assert (p3 - start).norm() < (p1 - start).norm()


def test_fedprox_split_equals_whole_and_survives_a_move():
    """Device part and edge session each apply the proximal term; the edge session moves
    (its reference weights in its optimizer state) half-way; the result is the whole
    model trained with FedProx in one piece, bit for bit."""
    mu, cut = 0.3, 3
    g = torch.Generator().manual_seed(5)
    data = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(4)]
    whole = build_model("vgg5", seed=2)
    opt = make_optimizer(whole.parameters(), lr=0.05, momentum=0.9, algo=Algo("fedprox", {"mu": mu}))
    for x, y in data:
        opt.zero_grad()
        LOSS(whole(x), y).backward()
        opt.step()

    twin = build_model("vgg5", seed=2)
    dev, edge = split_model(twin, cut)
    dev_opt = make_optimizer(dev.parameters(), lr=0.05, momentum=0.9, algo=Algo("fedprox", {"mu": mu}))
    session = EdgeSession(device="d", round=1, mode="fedfly", model="vgg5", split_layer=cut, lr=0.05, momentum=0.9,
                          part_state={k: v.clone() for k, v in edge.state_dict().items()},
                          algo=Algo("fedprox", {"mu": mu}))
    for step, (x, y) in enumerate(data):
        if step == 2:
            meta, tensors, checksum = session.snapshot()
            assert any(k.endswith("/prox_ref") for k in tensors)
            assert meta["optimizer"]["param_groups"][0]["algo"] == {"name": "fedprox", "params": {"mu": mu}}
            session = EdgeSession.from_snapshot(meta, tensors, checksum, expect_model="vgg5", expect_split=cut)
        dev_opt.zero_grad()
        act = dev(x)
        grads = []
        session.train_step(step, act.detach(), y, lambda gr, loss: grads.append(gr))
        act.backward(grads[0])
        dev_opt.step()
    assert state_sha256(whole.state_dict()) == state_sha256({**dev.state_dict(), **session.weights()})


@pytest.mark.parametrize("key,value", [("strategy.name", "fedsgd"), ("strategy.mu", -1.0),
                                       ("strategy.server_momentum", 1.0), ("strategy.server_lr", 0.0),
                                       ("strategy.trim_fraction", 0.5), ("strategy.krum_byzantine", -1),
                                       ("strategy.krum_keep", -2), ("strategy.clip_norm", -0.1),
                                       ("strategy.refuse_factor", 1.0), ("strategy.refuse_factor", -3.0),
                                       ("strategy.refuse_factor", float("nan"))])
def test_bad_strategy_settings_name_the_key(key, value):
    from common.errors import ConfigError
    from tests.test_config import _set, local_raw
    with pytest.raises(ConfigError) as err:
        config_mod.build_config(_set(local_raw(), key, value))
    assert err.value.key == key


def test_refuse_factor_error_says_what_it_means():
    from common.errors import ConfigError
    from tests.test_config import _set, local_raw
    with pytest.raises(ConfigError, match="median of the others"):
        config_mod.build_config(_set(local_raw(), "strategy.refuse_factor", 0.5))
    cfg = config_mod.build_config(_set(local_raw(), "strategy.refuse_factor", 0))
    assert cfg.strategy["refuse_factor"] == 0.0
    assert config_mod.build_config(local_raw()).strategy["refuse_factor"] == config_mod.REFUSE_FACTOR


@pytest.mark.parametrize("section,want", [
    ({"name": "median"}, {"name": "median"}),
    ({"name": "trimmed_mean", "trim_fraction": 0.3}, {"name": "trimmed_mean", "trim_fraction": 0.3}),
    ({"name": "krum", "krum_byzantine": 2, "krum_keep": 3}, {"name": "krum", "krum_byzantine": 2, "krum_keep": 3}),
    ({"name": "clip", "clip_norm": 1.5}, {"name": "clip", "clip_norm": 1.5})])
def test_robust_strategies_are_made_from_their_section(section, want):
    base = {"mu": 0.01, "server_lr": 1.0, "server_momentum": 0.9, "trim_fraction": 0.2, "krum_byzantine": 1,
            "krum_keep": 0, "clip_norm": 0.0, "refuse_factor": 10.0}
    assert make_strategy({**base, **section}).describe() == want
