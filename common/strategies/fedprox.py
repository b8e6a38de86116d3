"""FedProx (Li et al., MLSys 2020): FedAvg on the server; on every device and edge each
local step adds ``mu * (w - w_ref)`` to the gradient, the gradient of
``mu / 2 * ||w - w_ref||^2``, where ``w_ref`` is the parameter as the optimizer found it
(the round's global weights). ``w_ref`` is kept in the optimizer's state (``prox_ref``),
``mu`` in the plan's parameters (the param group's ``algo``), so both travel with a
migrated session and a device checkpoint. ``mu = 0`` is plain SGD."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from common.strategies.base import NONNEG, ClientStep, Key, correct_grads
from common.strategies.fedavg import FedAvg


class ProxStep(ClientStep):
    @staticmethod
    def setup(opt, names, params, tensors) -> None:
        if params["mu"]:
            for group in opt.param_groups:
                for p in group["params"]:
                    opt.state[p]["prox_ref"] = p.detach().clone()

    @staticmethod
    def correct(opt, group: dict[str, Any]) -> None:
        mu = group["algo"]["params"]["mu"]
        if mu:
            correct_grads(opt, group, "prox_ref", lambda p, ref: p - ref, alpha=mu)


@dataclass
class FedProx(FedAvg):
    mu: float = 0.01
    name: ClassVar[str] = "fedprox"
    PARAMS: ClassVar[dict[str, Key]] = {
        "mu": (float, 0.01, NONNEG, "fedprox: the proximal term's weight, pulling each local step towards the "
               "round's weights"),
    }
    CLIENT: ClassVar[type[ClientStep]] = ProxStep
    CLIENT_PARAMS: ClassVar[tuple[str, ...]] = ("mu",)
