"""One device's split-training session on an edge: the unit a migration moves.

A session holds everything the edge side of a device's round needs: the edge part of the
model (weights and batch-norm buffers), its SGD optimizer (momentum buffers), the round
and step counters, samples and loss so far, and an RNG state. ``snapshot`` turns it into
plain metadata plus named tensors (no pickle), with a checksum; ``from_snapshot`` checks
the checksum before it builds anything, so a damaged or partial snapshot never installs.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from common.errors import LocalProtocolError, MigrationError
from common.models import Part, empty_part
from common.plan import Algo
from common.strategies import strategy_class
from common.training import LOSS, make_optimizer, named_parameters, stable_seed
from edge.checksum import start_checksum

# How long after a take the next spare is built. A build is Python that holds the GIL;
# started at once, it held the edge's core and its writer threads for up to the GIL's
# switch interval just as the device's answer and the handover's last messages were to
# go (the moves' event logs showed the answer late: BENCHMARKS.md, section 2e). The
# device's next step comes well after its answer.
REFILL_DELAY_S = 0.02


class SparePart:
    """One empty edge part kept ready, built off the critical path: installing a migrated
    session takes it instead of constructing modules (milliseconds of Python) while the
    device waits. Thread-safe; refills itself in the background after each take."""

    def __init__(self, model: str, first: int) -> None:
        self._model, self._first = model, first
        self._lock = threading.Lock()
        self._spare: Part | None = None
        self._refilling = False
        self._refill()

    def _refill(self, delay: float = 0.0) -> None:
        part = None
        try:
            if delay:
                time.sleep(delay)
            part = empty_part(self._model, self._first)
        finally:
            with self._lock:
                self._spare = part if part is not None else self._spare
                self._refilling = False

    def take(self, first: int | None = None) -> Part:
        """The spare (or a new part, if it was already taken, or if the session starts at
        another layer ``first``: a device that cuts elsewhere)."""
        if first is not None and first != self._first:
            return empty_part(self._model, first)
        with self._lock:
            part, self._spare = self._spare, None
        return part if part is not None else empty_part(self._model, self._first)

    def refill_soon(self, delay: float = REFILL_DELAY_S) -> None:
        """Build the next spare in the background, ``delay`` seconds from now (call once
        the device has been answered, so that the build does not compete with the
        handover). One build at a time."""
        with self._lock:
            if self._spare is not None or self._refilling:
                return
            self._refilling = True
        threading.Thread(target=self._refill, args=(delay,), name="spare-part", daemon=True).start()


@dataclass(frozen=True)
class Reply:
    """The last answer a session sent: kept so that a step whose gradient was lost is
    answered again instead of trained twice."""
    step: int
    loss: float
    grad: torch.Tensor


class EdgeSession:
    """A device's edge-side state for one round. It has no lock: one thread (the edge's
    core) owns every session, and its lifecycle (``edge.lifecycle``) says when it may
    train, move or go."""

    def __init__(self, *, device: str, round: int, mode: str, model: str, split_layer: int,
                 lr: float, momentum: float, part_state: dict[str, torch.Tensor] | None,
                 step: int = 0, samples: int = 0, loss_sum: float = 0.0, seed: int = 0,
                 adopt: bool = False, part: Part | None = None, algo: Algo | None = None,
                 algo_tensors: dict[str, torch.Tensor] | None = None, awaits_state: bool = False) -> None:
        """``algo_tensors``: the round's tensors for this part ("tag/key"). ``awaits_state``:
        the algorithm keeps a state on the device (SCAFFOLD's ``c_i``); the optimizer is set
        up once the device's arrives (``take_state``), and no step trains before. Only a
        session built from the round's weights waits, so at step 0, and a session at step 0
        is never installed elsewhere (its destination starts it from the round's weights):
        a snapshot never carries a waiting session."""
        self.device = device
        self.round = round
        self.mode = mode
        self.model_name = model
        self.split_layer = split_layer
        self.lr = lr
        self.momentum = momentum
        self.step = step
        self.samples = samples
        self.loss_sum = loss_sum
        self.last_reply: Reply | None = None
        self._prepared: tuple[dict[str, Any], dict[str, torch.Tensor], Callable[[], str]] | None = None
        # An RNG for the edge part's random layers (none in VGG-5; kept so that a model
        # with dropout would migrate exactly too). Seeded per (device, round).
        self.rng = torch.Generator().manual_seed(stable_seed("edge-rng", seed, device, round))
        self.part: Part | None = None
        self.optimizer: torch.optim.SGD | None = None
        if mode != "classic":
            if part_state is None:
                raise ValueError("a split session needs the edge part's weights")
            self.part = part if part is not None else empty_part(model, split_layer + 1)
            # adopt: take the given tensors as the part's own storage instead of copying
            # (a received snapshot, owned by nobody else). Never for a round's global
            # weights, which every session of the round starts from.
            self.part.load_state_dict(part_state, assign=adopt)
            self.part.train()
            # the round's client-side algorithm (common.strategies) on the part as loaded, the
            # round's weights; what it keeps is in the optimizer's state, so a migrated
            # session's comes back with it (``_rebuild`` loads it over this)
            self.optimizer = make_optimizer(named_parameters(self.part), lr=lr, momentum=momentum, algo=algo,
                                            tensors=None if awaits_state else algo_tensors)
        self._algo = algo
        self._round_tensors = algo_tensors if awaits_state else None
        self.awaits_state = awaits_state and self.optimizer is not None

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """The edge part's parameters by state-dict key (none in mode classic)."""
        return named_parameters(self.part) if self.part is not None else []

    def take_state(self, state: dict[str, torch.Tensor]) -> None:
        """Set the optimizer up with the round's tensors and the device's kept ``state``
        ("tag/key" of this part, checked by the caller); the session may train then."""
        assert self.awaits_state and self.optimizer is not None and self._algo is not None
        names = [n for n, _ in self.named_parameters()]
        client = strategy_class(self._algo.name).CLIENT
        assert client is not None
        client.setup(self.optimizer, names, self._algo.params, {**(self._round_tensors or {}), **state})
        self._round_tensors = None
        self.awaits_state = False

    def position_matches(self, step: int) -> bool:
        """True if a device about to send ``step`` can go on with this session: it is at
        ``step``, or one further with the reply to ``step`` kept."""
        return self.step == step or (self.last_reply is not None and self.last_reply.step == step
                                     and self.step == step + 1)

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor,
                   reply: Callable[[torch.Tensor, float], None], *, cut_first: bool = True) -> bool:
        """Step ``step``, exactly once. The next step is trained: forward, loss, backward
        on the edge part, ``reply(grad_at_cut, loss)`` as soon as the cut's gradient exists
        (the device back-propagates while we step), then the optimizer step; returns True.
        The step just trained again is answered from the kept reply, not trained; returns
        False. Anything else raises ``MigrationError`` and changes nothing.

        ``cut_first`` (``training.cut_gradient_first``): the backward pass in two, the
        gradient at the cut alone first (the engine skips every weight's gradient), then
        the weights' (the layers' input gradients again, but the first layer's). The
        device gets its gradient after about half the backward pass, not all of it, for
        a little more compute (BENCHMARKS.md, section 3), done while the device computes.
        The same kernels on the same values: the same bits as one pass."""
        if self.last_reply is not None and step == self.last_reply.step and step == self.step - 1:
            reply(self.last_reply.grad, self.last_reply.loss)
            return False
        if step != self.step:
            raise MigrationError(f"{self.device}: step {step} arrived, session expects step {self.step}")
        assert self.part is not None and self.optimizer is not None
        self._prepared = None
        x = x.detach().requires_grad_(True)
        self.optimizer.zero_grad(set_to_none=True)
        loss = LOSS(self.part(x), y)
        weights = [p for p in self.part.parameters() if p.requires_grad]
        if cut_first and weights:
            (grad,) = torch.autograd.grad(loss, (x,), retain_graph=True)
            value = loss.item()
            reply(grad, value)
            loss.backward(inputs=weights)
        else:
            loss.backward()
            value = loss.item()
            grad = x.grad
            assert grad is not None
            reply(grad, value)
        self.optimizer.step()
        self.last_reply = Reply(step, value, grad)
        self.step += 1
        self.samples += int(y.shape[0])
        self.loss_sum += value
        return True

    def weights(self) -> dict[str, torch.Tensor]:
        """The edge part's state (weights and buffers); empty in mode classic."""
        return dict(self.part.state_dict()) if self.part is not None else {}

    # -- migration -----------------------------------------------------------------------

    def unshare(self) -> None:
        """Give the edge part and its optimizer storage of their own again (the same
        values). A snapshot holds the session's tensors themselves, not copies, while a
        link's writer thread sends it; when a handover is called off and the session
        trains here again, its steps must not change the bytes still on their way (the
        destination would get a torn copy, which its checksum refuses)."""
        self._prepared = None
        if self.part is None or self.optimizer is None:
            return
        with torch.no_grad():
            for t in [*self.part.parameters(), *self.part.buffers()]:
                t.data = t.data.clone()
        for st in self.optimizer.state.values():
            for name, v in list(st.items()):
                if isinstance(v, torch.Tensor):
                    st[name] = v.clone()

    def prepare_snapshot(self) -> None:
        """Start the snapshot's checksum now, on the hashing threads, ahead of a pull (the
        edge calls this when the device leaves at a step boundary), so that a handover
        only has to send it. A step trained after this discards it."""
        if self._prepared is None:
            meta, tensors = self._parts(with_reply=False)
            self._prepared = (meta, tensors, start_checksum(meta, tensors))

    def start_snapshot(self, *, with_reply: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor],
                                                                   Callable[[], str]]:
        """(metadata, tensors, checksum()): the checksum is computed on the hashing threads
        meanwhile (calling it waits for it), so the tensors can be sent at once."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and not with_reply:
            return prepared
        meta, tensors = self._parts(with_reply=with_reply)
        return meta, tensors, start_checksum(meta, tensors)

    def snapshot(self, *, with_reply: bool = False) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
        """(metadata, tensors, checksum). ``with_reply``: carry the kept reply too, for a
        device that lost the gradient of the last step (a move at a step boundary does
        not need it, and it is as large as a batch of activations). The tensors are the
        session's own (no copy): the session must not train while they are being sent."""
        meta, tensors, digest = self.start_snapshot(with_reply=with_reply)
        return meta, tensors, digest()

    def _parts(self, *, with_reply: bool) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        tensors: dict[str, torch.Tensor] = {}
        opt_meta: dict[str, Any] = {}
        if self.part is not None and self.optimizer is not None:
            for k, v in self.part.state_dict().items():
                tensors[f"model/{k}"] = v
            opt = self.optimizer.state_dict()
            for idx, st in opt["state"].items():
                for name, t in st.items():
                    if not isinstance(t, torch.Tensor):
                        raise MigrationError(f"optimizer state {name} is not a tensor")
                    tensors[f"opt/{idx}/{name}"] = t
            opt_meta = {"param_groups": opt["param_groups"]}
        tensors["rng"] = self.rng.get_state()
        reply_meta = None
        if with_reply and self.last_reply is not None:
            reply_meta = {"step": self.last_reply.step, "loss": self.last_reply.loss}
            tensors["reply/grad"] = self.last_reply.grad
        meta = {"device": self.device, "round": self.round, "mode": self.mode, "model": self.model_name,
                "split_layer": self.split_layer, "lr": self.lr, "momentum": self.momentum,
                "step": self.step, "samples": self.samples, "loss_sum": self.loss_sum, "optimizer": opt_meta,
                "last_reply": reply_meta}
        return meta, tensors

    @classmethod
    def from_snapshot(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], checksum: str,
                      *, expect_model: str, expect_split: int, spare: SparePart | None = None,
                      digests: dict[str, bytes] | None = None) -> "EdgeSession":
        """Verify and rebuild. Raises ``MigrationError`` when the checksum, the model or any
        field does not match; the caller installs only what this returns. ``digests``: the
        tensors' digests as their bytes arrived (``codec.arrival_digests``), so only the
        SHA-256 over them is left to compute; what they lack is computed on the hashing
        threads while the session object is built."""
        verified = start_checksum(meta, tensors, digests)
        try:
            session = cls._rebuild(meta, tensors, expect_model=expect_model, expect_split=expect_split, spare=spare)
        except MigrationError as exc:
            failure: MigrationError | None = exc
        else:
            failure = None
        got = verified()  # a damaged snapshot is reported as such, whatever else went wrong
        if got != checksum:
            raise MigrationError(f"snapshot checksum mismatch ({got[:12]} != {checksum[:12]}): not installed")
        if failure is not None:
            raise failure
        return session

    @classmethod
    def _rebuild(cls, meta: dict[str, Any], tensors: dict[str, torch.Tensor], *, expect_model: str,
                 expect_split: int, spare: SparePart | None) -> "EdgeSession":
        try:
            if meta["model"] != expect_model or meta["split_layer"] != expect_split:
                raise MigrationError(f"snapshot is for {meta['model']} split {meta['split_layer']}, "
                                     f"this edge runs {expect_model} split {expect_split}")
            known = {"rng", "reply/grad"}
            for k in tensors:
                if k not in known and not k.startswith(("model/", "opt/")):
                    raise MigrationError(f"snapshot holds an unknown tensor {k!r}")
            session = cls(device=meta["device"], round=meta["round"], mode=meta["mode"], model=meta["model"],
                          split_layer=meta["split_layer"], lr=meta["lr"], momentum=meta["momentum"],
                          part_state={k[6:]: v for k, v in tensors.items() if k.startswith("model/")},
                          step=meta["step"], samples=meta["samples"], loss_sum=meta["loss_sum"], adopt=True,
                          part=spare.take(meta["split_layer"] + 1) if spare is not None and meta["mode"] != "classic" else None)
            if session.part is not None and session.optimizer is not None:
                state: dict[int, dict[str, torch.Tensor]] = {}
                for k, v in tensors.items():
                    if k.startswith("opt/"):
                        _, idx, name = k.split("/", 2)
                        state.setdefault(int(idx), {})[name] = v
                groups = meta["optimizer"]["param_groups"]
                for group in groups:  # the algorithm it names runs at every step: known, its parameters checked
                    try:
                        why = Algo.from_wire(group.get("algo")).problem()
                    except LocalProtocolError as exc:
                        why = str(exc)
                    if why:
                        raise MigrationError(f"snapshot's optimizer: {why}")
                session.optimizer.load_state_dict({"state": state, "param_groups": groups})
            session.rng.set_state(tensors["rng"].clone())
            last = meta.get("last_reply")
            if last is not None:
                grad = tensors["reply/grad"]
                if not (isinstance(last, dict) and type(last.get("step")) is int and isinstance(last.get("loss"), float)):
                    raise MigrationError("snapshot's last reply is not {step, loss}")
                session.last_reply = Reply(last["step"], last["loss"], grad)
            elif "reply/grad" in tensors:
                raise MigrationError("snapshot holds a reply tensor without its step")
        except MigrationError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise MigrationError(f"snapshot does not describe a session: {type(exc).__name__}: {exc}") from exc
        return session
