"""Splittable models: any registered model (``common.nets``) as numbered layers, so that
any cut is a pair of parts.

A model is named by its key (``common.nets.ModelSpec``): ``"vgg5"`` is FedFly's VGG-5
for 3x32x32 images and 10 classes; ``"resnet18/1x28x28/10"`` a ResNet-18 for MNIST.
At split layer ``s`` the device runs layers 0..s and the edge runs s+1..last. Parts keep
the full model's parameter names (``l<index>.<...>``), so a device part's state_dict and
an edge part's state_dict join into the full model's state_dict with a plain dict union,
and FedAvg works on full models whatever the split (and whatever each device's split).
When training, a block ending in a ReLU and the 2x2 max-pool after it run as one step
that keeps less for the backward pass (``common.nets.fused``): the same modules, keys and bits.
"""

from __future__ import annotations

import functools
import hashlib
import importlib

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from common.nets import ModelSpec, net
from common.nets.fused import block_relu_maxpool2x2, fusable


@functools.lru_cache(maxsize=None)
def layer_builders(model: str) -> tuple:
    """One zero-argument factory per layer of ``model`` (a key), so a part builds only its own layers."""
    spec = ModelSpec.parse(model)
    entry = net(spec.name)
    makers = tuple(importlib.import_module(entry.module).layers(spec))
    if len(makers) != len(entry.layers):
        raise RuntimeError(f"{entry.module} builds {len(makers)} layers, the registry names {len(entry.layers)}")
    return makers


class Part(nn.Module):
    """Layers ``first..last`` (inclusive) of a model, named by their global index."""

    def __init__(self, layers: list[nn.Module], first: int) -> None:
        super().__init__()
        self.first = first
        self.layers = nn.ModuleDict({f"l{first + i}": layer for i, layer in enumerate(layers)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self.layers.values())
        fuse = torch.is_grad_enabled()  # (only what autograd keeps differs: the same values)
        i = 0
        while i < len(layers):
            if fuse and i + 1 < len(layers) and fusable(layers[i], layers[i + 1]):
                x = block_relu_maxpool2x2(layers[i], x)
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x

    def state_dict(self, *args, **kwargs):  # type: ignore[override]
        # Drop the "layers." prefix so keys are the same in a part and in the whole model.
        sd = super().state_dict(*args, **kwargs)
        return type(sd)((k.removeprefix("layers."), v) for k, v in sd.items())

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        if strict:
            # Checked here because re-keying drops torch's version metadata, which makes
            # BatchNorm quietly fill in a missing num_batches_tracked instead of failing.
            want, got = set(self.state_dict()), set(state_dict)
            if want != got:
                raise RuntimeError(f"state_dict keys do not match the part: missing {sorted(want - got)}, "
                                   f"unexpected {sorted(got - want)}")
        return super().load_state_dict({f"layers.{k}": v for k, v in state_dict.items()}, strict=strict, assign=assign)


def build_model(name: str, *, seed: int) -> Part:
    """The whole model with its initial weights, the same in every process for ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return Part([make() for make in layer_builders(name)], 0)


def split_model(model: Part, split_layer: int) -> tuple[Part, Part]:
    """(device part: layers 0..split_layer, edge part: the rest), sharing the model's modules."""
    layers = list(model.layers.values())
    if not 0 <= split_layer < len(layers) - 1:
        raise ValueError(f"split layer {split_layer} is outside 0..{len(layers) - 2}")
    return Part(layers[: split_layer + 1], 0), Part(layers[split_layer + 1:], split_layer + 1)


def empty_part(name: str, first: int, last: int | None = None) -> Part:
    """Layers ``first..last`` with uninitialised weights, for a state that will be loaded
    right after (a migrated session): skips the random initialisation of every layer."""
    # Module.to_empty would copy each meta tensor's layout through torch's Python
    # references, importing sympy (common.footprint): plain empty tensors instead.
    return _meta_part(name, first, last)._apply(lambda t: torch.empty(t.shape, dtype=t.dtype))


class _NoInit(TorchFunctionMode):
    """``torch.nn.init``'s functions leave a meta tensor as it is: it has no values to fill,
    and on torch 2.9 (the Raspberry Pi's build) their meta kernels import sympy, hundreds of
    modules a device would hold for nothing (BENCHMARKS.md, "aarch64 under qemu")."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__module__", "") == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **(kwargs or {}))


def _meta_part(name: str, first: int, last: int | None = None) -> Part:
    """Layers ``first..last`` on the meta device: names, shapes and dtypes, no memory."""
    makers = layer_builders(name)
    last = len(makers) - 1 if last is None else last
    with torch.device("meta"), _NoInit():
        return Part([make() for make in makers[first:last + 1]], first)


def num_classes(name: str) -> int:
    """How many classes the model's last layer scores (labels must lie in 0..n-1)."""
    return ModelSpec.parse(name).classes


def state_spec(name: str) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every state-dict key of the whole model with its shape and dtype (what an update
    must carry, checked before anything is summed)."""
    return {k: (tuple(v.shape), v.dtype) for k, v in _meta_part(name, 0).state_dict().items()}


def weights_problem(weights: dict[str, torch.Tensor], spec: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> str:
    """Why ``weights`` (from a peer) do not fit ``spec`` (a part of ``state_spec``): a
    name missing or made up, a shape or dtype that differs; '' if they fit. Checked
    before ``load_state_dict``, which raises ``RuntimeError`` or casts silently."""
    if set(weights) != set(spec):
        return "weights do not match the model's names"
    for k, (shape, dtype) in spec.items():
        t = weights[k]
        if tuple(t.shape) != shape or t.dtype != dtype:
            return f"{k} is {t.dtype} {list(t.shape)[:8]}, the model has {dtype} {list(shape)}"
    return ""


def device_part(name: str, split_layer: int, *, seed: int = 0) -> Part:
    return split_model(build_model(name, seed=seed), split_layer)[0]


def edge_part(name: str, split_layer: int, *, seed: int = 0) -> Part:
    return split_model(build_model(name, seed=seed), split_layer)[1]


def part_keys(name: str, split_layer: int) -> tuple[list[str], list[str]]:
    """State-dict keys of the device part and of the edge part."""
    dev, edge = _part_keys(name, split_layer)
    return list(dev), list(edge)


@functools.lru_cache(maxsize=64)
def _part_keys(name: str, split_layer: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    dev, edge = split_model(_meta_part(name, 0), split_layer)
    return tuple(dev.state_dict()), tuple(edge.state_dict())


def select(state: dict[str, torch.Tensor], keys: list[str]) -> dict[str, torch.Tensor]:
    return {k: state[k] for k in keys}


def state_sha256(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over the raw bytes of every tensor, in state_dict order."""
    h = hashlib.sha256()
    for t in state.values():
        flat = t.detach().contiguous().reshape(-1)
        if flat.numel():
            h.update(memoryview(flat.view(torch.uint8).numpy()))
    return h.hexdigest()


def clone_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}
