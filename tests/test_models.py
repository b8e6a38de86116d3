"""VGG-5 split into numbered parts: every split behaves exactly like the whole model.

The device runs layers 0..s, the edge s+1..6; the device receives the gradient at the cut
and back-propagates it with ``out.backward(grad)`` (as device/client.py does), the edge
detaches its input and calls ``loss.backward()`` (as edge/session.py does). Outputs,
losses, every parameter gradient and the batch-norm running statistics must be bit for
bit those of the whole model trained in one piece.
"""

from __future__ import annotations

import pytest
import torch

from common.models import (build_model, clone_state, device_part, edge_part, empty_part, part_keys, select,
                           split_model, state_sha256)
from common.training import LOSS

SPLITS = range(0, 6)  # valid split layers of VGG-5 (7 layers): 0 .. 5


def _batch(n: int = 4, seed: int = 123) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("split", SPLITS)
def test_split_forward_and_backward_are_bit_identical_to_the_whole_model(split):
    x, y = _batch()
    whole = build_model("vgg5", seed=11)
    whole.train()
    out_whole = whole(x)
    loss_whole = LOSS(out_whole, y)
    loss_whole.backward()

    twin = build_model("vgg5", seed=11)
    dev, edge = split_model(twin, split)
    dev.train()
    edge.train()
    # device side
    cut = dev(x)
    # edge side: what crosses the wire is a detached copy of the activations
    at_edge = cut.detach().clone().requires_grad_(True)
    out_split = edge(at_edge)
    loss_split = LOSS(out_split, y)
    loss_split.backward()
    grad_at_cut = at_edge.grad.detach().clone()
    # device side again
    cut.backward(grad_at_cut)

    assert torch.equal(out_whole, out_split)
    assert loss_whole.item() == loss_split.item()
    g_whole = _grads(whole)
    g_split = _grads(twin)  # the parts share the twin's modules
    assert g_whole.keys() == g_split.keys()
    for name in g_whole:
        assert g_whole[name] is not None and g_split[name] is not None, name
        assert torch.equal(g_whole[name], g_split[name]), name
    # batch-norm running statistics (train mode updates them) match too
    s_whole, s_twin = whole.state_dict(), twin.state_dict()
    assert s_whole.keys() == s_twin.keys()
    for k in s_whole:
        assert torch.equal(s_whole[k], s_twin[k]), k
    assert state_sha256(s_whole) == state_sha256(s_twin)


@pytest.mark.parametrize("split", SPLITS)
def test_parts_keep_the_whole_models_names(split):
    whole = build_model("vgg5", seed=3)
    full_keys = list(whole.state_dict())
    dev, edge = split_model(whole, split)
    dk, ek = list(dev.state_dict()), list(edge.state_dict())
    assert set(dk).isdisjoint(ek)
    assert dk + ek == full_keys  # same names, same order
    assert (dk, ek) == part_keys("vgg5", split)
    # the device part holds layers 0..split, the edge part the rest
    assert {k.split(".")[0] for k in dk} == {f"l{i}" for i in range(0, split + 1) if i not in (1, 3)}
    assert {k.split(".")[0] for k in ek} == {f"l{i}" for i in range(split + 1, 7) if i not in (1, 3)}
    # a plain dict union of the parts loads into a fresh whole model
    joined = {**dev.state_dict(), **edge.state_dict()}
    fresh = build_model("vgg5", seed=99)
    fresh.load_state_dict(joined)
    assert state_sha256(fresh.state_dict()) == state_sha256(whole.state_dict())
    # and select() cuts a whole state back into the parts
    assert state_sha256(select(whole.state_dict(), dk)) == state_sha256(dev.state_dict())


@pytest.mark.parametrize("split", SPLITS)
def test_device_part_and_edge_part_helpers_take_the_seeded_weights(split):
    whole = build_model("vgg5", seed=5)
    ref_dev, ref_edge = split_model(whole, split)
    assert state_sha256(device_part("vgg5", split, seed=5).state_dict()) == state_sha256(ref_dev.state_dict())
    assert state_sha256(edge_part("vgg5", split, seed=5).state_dict()) == state_sha256(ref_edge.state_dict())


def test_part_load_state_dict_round_trip():
    dev, edge = split_model(build_model("vgg5", seed=1), 2)
    _, other_edge = split_model(build_model("vgg5", seed=2), 2)
    assert state_sha256(edge.state_dict()) != state_sha256(other_edge.state_dict())
    other_edge.load_state_dict(edge.state_dict())
    assert state_sha256(edge.state_dict()) == state_sha256(other_edge.state_dict())
    with pytest.raises(RuntimeError):  # strict: a device part's keys do not fit an edge part
        other_edge.load_state_dict(dev.state_dict())


@pytest.mark.parametrize("bad", [-1, 6, 7, 100])
def test_split_layer_out_of_range(bad):
    with pytest.raises(ValueError):
        split_model(build_model("vgg5", seed=0), bad)


def test_build_model_is_deterministic_per_seed_and_leaves_the_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    a = build_model("vgg5", seed=42).state_dict()
    b = build_model("vgg5", seed=42).state_dict()
    c = build_model("vgg5", seed=43).state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert a.keys() == b.keys() == c.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert state_sha256(a) == state_sha256(b)
    assert state_sha256(a) != state_sha256(c)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_output_shape():
    x, _ = _batch(n=3)
    assert build_model("vgg5", seed=0)(x).shape == (3, 10)


def test_state_sha256_changes_when_one_bit_changes():
    state = clone_state(build_model("vgg5", seed=0).state_dict())
    base = state_sha256(state)
    assert state_sha256(clone_state(state)) == base  # same bytes, same hash
    # flip the lowest mantissa bit of one float weight
    flipped = clone_state(state)
    w = flipped["l4.conv.weight"].view(-1)
    w.view(torch.int32)[17] ^= 1
    assert not torch.equal(flipped["l4.conv.weight"], state["l4.conv.weight"])
    assert state_sha256(flipped) != base
    # flip one bit of an integer buffer
    flipped2 = clone_state(state)
    flipped2["l0.bn.num_batches_tracked"] ^= 1
    assert state_sha256(flipped2) != base
    # the highest bit (sign) of the last element of the last tensor
    flipped3 = clone_state(state)
    last = list(flipped3)[-1]
    flipped3[last].view(-1).view(torch.int32)[-1] ^= -(1 << 31)
    assert state_sha256(flipped3) != base


def test_clone_state_copies():
    state = build_model("vgg5", seed=0).state_dict()
    cloned = clone_state(state)
    cloned["l6.fc.bias"].add_(1.0)
    assert not torch.equal(cloned["l6.fc.bias"], state["l6.fc.bias"])


@pytest.mark.parametrize("split", SPLITS)
def test_empty_part_loaded_with_a_state_is_the_part(split):
    whole = build_model("vgg5", seed=21)
    dev, edge = split_model(whole, split)
    for ref, part in ((edge, empty_part("vgg5", split + 1)), (dev, empty_part("vgg5", 0, split))):
        ref_state = ref.state_dict()
        assert list(part.state_dict()) == list(ref_state)
        for k, v in part.state_dict().items():
            assert v.shape == ref_state[k].shape and v.dtype == ref_state[k].dtype and v.device.type == "cpu", k
        part.load_state_dict(ref_state)
        assert state_sha256(part.state_dict()) == state_sha256(ref_state)
    # and it computes what the part computes, in train mode
    x, y = _batch(n=2)
    cut = dev(x).detach()
    loaded = empty_part("vgg5", split + 1)
    loaded.load_state_dict(edge.state_dict())
    edge.train()
    loaded.train()
    assert torch.equal(edge(cut), loaded(cut))


def test_strict_load_refuses_a_state_missing_a_batch_norm_counter():
    state = dict(split_model(build_model("vgg5", seed=1), 3)[1].state_dict())
    del state["l4.bn.num_batches_tracked"]
    with pytest.raises((RuntimeError, ValueError, KeyError)):
        empty_part("vgg5", 4).load_state_dict(state)
