"""DNAS / EdMIPS' super-network layers (methods-next.md "DNAS and EdMIPS"; EdMIPS models/quant_module.py).

A mixed layer is a FracBits layer (DoReFa weight, PACT input, `bsq.quant.frac`) whose integer bit-width is chosen
among candidates by architecture parameters theta. EdMIPS' efficient form: the candidates' quantized weights are
mixed before ONE convolution, w_mix = sum_c pi_c DoReFa_c(w) (one shared float weight, EdMIPS' share_weight=True),
and likewise the PACT-quantized inputs x_mix = sum_a pi_a PACT_a(x). pi = softmax(theta / T) (EdMIPS) or a
Gumbel-softmax sample softmax((theta + g) / T) while training (DNAS). Each candidate is the FracBits quantizer at
that integer bit-width (`dorefa_weight` / `pact_activation` with hard bits), so a one-hot pi is exactly the FracBits
layer at that bit-width, and the derived model is a plain Form.FRAC model.

theta spans every integer of the layer's range [min, max] of its candidates; a boolean buffer marks the candidates
(the others never enter the mixture), so a checkpoint rebuilds from the FracBits policy alone (`build`).
Single-candidate layers (the fixed 8-bit first conv and last linear) are FracBits layers held hard.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bsq.quant.convert import set_submodule
from bsq.quant.frac import (
    FracConv2d,
    FracLayer,
    FracLinear,
    FracPolicy,
    dorefa_weight,
    frac_layers,
    frac_quantize_model,
    pact_activation,
)

__all__ = [
    "MixedLayer",
    "MixedConv2d",
    "MixedLinear",
    "mixed_layers",
    "mixture_weights",
    "to_supernet_",
    "build",
    "configure_",
    "derive_",
    "theta_parameters",
    "theta_slots",
    "save_theta_state_",
    "load_theta_state_",
]


def mixture_weights(theta: torch.Tensor, temperature: float, gumbel: bool) -> torch.Tensor:
    """softmax(theta / T), or a Gumbel-softmax sample softmax((theta + g) / T), g = -log(-log U) (DNAS)."""
    if gumbel:
        u = torch.rand_like(theta).clamp_(1e-10, 1 - 1e-10)
        theta = theta - torch.log(-torch.log(u))
    return F.softmax(theta / temperature, dim=0)


class MixedLayer(FracLayer):
    """Mixin of MixedConv2d / MixedLinear: theta over the candidate bit-widths and the mixed quantizers."""

    checkpoint_form = "dnas"  # the training form of its resume files (Method.forms of bsq.methods.dnas)
    form = "dnas"  # not "frac": bsq.checkpoint.model_form reads FracLayer.form too
    temperature = 1.0  # set per epoch (`configure_`); a Python float, not state
    gumbel = False

    def _setup_mixed(self, w_cands: Sequence[int] | None, a_cands: Sequence[int] | None) -> None:
        """theta_w / theta_a over the integer range, masks of the candidates (None: the whole range)."""
        dev = self.weight.device
        for kind, bounds, cands in (("w", self.w_range, w_cands), ("a", self.a_range, a_cands)):
            searched = bounds is not None and bounds[0] < bounds[1]
            size = bounds[1] - bounds[0] + 1 if searched else 0
            allowed = torch.zeros(size, dtype=torch.bool, device=dev)
            if searched:
                for c in cands if cands is not None else range(bounds[0], bounds[1] + 1):
                    allowed[c - bounds[0]] = True
            self.register_buffer(f"{kind}_allowed", allowed)
            theta = nn.Parameter(torch.zeros(size, device=dev)) if searched else None
            self.register_parameter(f"theta_{kind}", theta)
            if searched:  # theta's optimiser state, kept in the model so a resumed search continues exactly
                self.register_buffer(f"theta_{kind}_m1", torch.zeros(size, device=dev))
                self.register_buffer(f"theta_{kind}_m2", torch.zeros(size, device=dev))
                self.register_buffer(f"theta_{kind}_step", torch.zeros((), device=dev))
        self._sync_flags()

    # -- the FracLayer flags: lambda never trains here, theta does --
    @property
    def searches_weight(self) -> bool:
        return False

    @property
    def searches_act(self) -> bool:
        return False

    def _sync_flags(self) -> None:
        self.w_cands = self._cands("w")  # first: FracLayer's flags read the bits through `rounded_bits`
        self.a_cands = self._cands("a")
        super()._sync_flags()
        for theta in (getattr(self, "theta_w", None), getattr(self, "theta_a", None)):
            if theta is not None:
                theta.requires_grad_(not self.is_hard)

    def _cands(self, kind: str) -> list[int]:
        """The candidates ([lo] for a fixed range, [] for a float input)."""
        bounds = self.w_range if kind == "w" else self.a_range
        allowed = getattr(self, f"{kind}_allowed", None)
        if bounds is None or allowed is None:
            return []
        if allowed.numel() == 0:
            return [bounds[0]]
        return [bounds[0] + int(i) for i in torch.nonzero(allowed.cpu()).flatten()]

    @property
    def mixing(self) -> bool:
        return not self.is_hard and (len(self.w_cands) > 1 or len(self.a_cands) > 1)

    def probs(self, kind: str, sample: bool = False) -> torch.Tensor:
        """Mixture weights over `w_cands` / `a_cands`: softmax(theta / T), or a Gumbel sample when `sample`."""
        cands = self.w_cands if kind == "w" else self.a_cands
        theta = getattr(self, f"theta_{kind}")
        lo = (self.w_range if kind == "w" else self.a_range)[0]
        logits = theta[[c - lo for c in cands]]
        return mixture_weights(logits, self.temperature, sample and self.gumbel)

    def argmax_bits(self) -> tuple[int, int | None]:
        """(weight bits, input bits) of the most probable candidates (EdMIPS fetch_best_arch)."""
        own_w, own_a = FracLayer.rounded_bits(self)  # the fixed (or frozen) bits
        w = self.w_cands[int(self.probs("w").argmax())] if len(self.w_cands) > 1 else int(own_w)
        a = self.a_cands[int(self.probs("a").argmax())] if len(self.a_cands) > 1 else own_a
        return w, None if a is None else int(a)

    # -- forward --
    def quantized_weight(self) -> torch.Tensor:
        if self.is_hard or len(self.w_cands) < 2:
            return super().quantized_weight()
        pi = self.probs("w", sample=self.training)
        w = sum(
            pi[i] * dorefa_weight(self.weight, torch.tensor(float(c)), c, c, True) for i, c in enumerate(self.w_cands)
        )
        if self.rescale:  # SAT rescale as FracLayer (only the fixed last layer has it by default)
            w = w / (self.weight.shape[0] ** 0.5 * w.std().detach().clamp_min(1e-12))
        return w

    def quantized_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.is_hard or len(self.a_cands) < 2:
            return super().quantized_input(x)
        x = x.float()
        pi = self.probs("a", sample=self.training)
        return sum(
            pi[i] * pact_activation(x, self.act_alpha, torch.tensor(float(c)), c, c, True, self.is_signed, self.variant)
            for i, c in enumerate(self.a_cands)
        )

    # -- accounting: a mixed layer costs its argmax candidates (what it would be derived to) --
    def rounded_bits(self, offset: float = 0.0) -> tuple[torch.Tensor, float | None]:
        w, a = super().rounded_bits(offset)
        if not self.mixing:
            return w, a
        best_w, best_a = self.argmax_bits()
        return torch.tensor(float(best_w)), None if a is None else float(best_a)

    @torch.no_grad()
    def freeze_(self, w_bits: int, a_bits: int | None) -> None:
        """Fix the layer at the chosen candidates: from now on it is the FracBits layer at those bits."""
        self.wbits.fill_(w_bits)
        if a_bits is not None:
            self.abits.fill_(a_bits)
        self.hard.fill_(True)
        self._sync_flags()


class MixedConv2d(MixedLayer, FracConv2d):
    """`FracConv2d` whose weight (and input) bit-width is a mixture of candidates."""


class MixedLinear(MixedLayer, FracLinear):
    """`FracLinear` whose weight (and input) bit-width is a mixture of candidates."""


def mixed_layers(model: nn.Module) -> Iterator[tuple[str, MixedLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, MixedLayer):
            yield name, module


def _twin(layer: FracLayer, cls: type, w_cands, a_cands) -> MixedLayer:
    """The mixed twin of a FracBits layer: same geometry, ranges, state (weights, clip, flags)."""
    mixed = cls.from_float(layer, layer.w_range, layer.a_range, False, 0.0, 1.0, layer.variant)
    mixed.rescale, mixed.blend = layer.rescale, layer.blend
    mixed._setup_mixed(w_cands, a_cands)
    mixed.load_state_dict(layer.state_dict(), strict=False)  # theta and masks are the twin's own
    if len(mixed.w_cands) > 1 or len(mixed.a_cands) > 1:
        mixed.hard.fill_(False)  # searched: the mixture decides (whatever the policy's `hard` said)
        mixed._sync_flags()
    else:
        mixed.freeze_(*mixed.argmax_bits())
    return mixed


def to_supernet_(
    model: nn.Module, w_cands: Sequence[int] | None = None, a_cands: Sequence[int] | None = None, init: float = 0.01
) -> nn.Module:
    """Every FracBits layer of `model` (from `frac_quantize_model`) swapped for its mixed twin, in place. A layer
    with a searched range gets the candidates (None: every integer of its range); theta starts at `init`."""
    for name, layer in list(frac_layers(model)):
        cls = MixedLinear if isinstance(layer, nn.Linear) else MixedConv2d
        ws = [c for c in w_cands if layer.w_range[0] <= c <= layer.w_range[1]] if w_cands is not None else None
        a_range = layer.a_range
        as_ = None if a_cands is None or a_range is None else [c for c in a_cands if a_range[0] <= c <= a_range[1]]
        mixed = _twin(layer, cls, ws, as_)
        with torch.no_grad():
            for theta in (mixed.theta_w, mixed.theta_a):
                if theta is not None:
                    theta.fill_(init)
        set_submodule(model, name, mixed)
    return model


def build(model: nn.Module, policy: Mapping | None, precisions: Mapping[str, int]) -> nn.Module:
    """The empty training-form model of a `dnas` checkpoint (Method.forms): the FracBits structure of `policy`,
    mixed layers over the whole ranges; the candidate masks, theta and flags come with the state dict."""
    return to_supernet_(frac_quantize_model(model, FracPolicy(**(policy or {}))))


def configure_(model: nn.Module, temperature: float, gumbel: bool) -> None:
    """The mixture of every layer for this epoch (Python attributes, not state: set on every start and resume)."""
    for _, layer in mixed_layers(model):
        layer.temperature, layer.gumbel = float(temperature), bool(gumbel)


def theta_slots(model: nn.Module) -> list[tuple[nn.Parameter, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(theta, first moment / momentum, second moment, step count) of every searched theta: the buffers that carry
    theta's optimiser state through resume files (`save_theta_state_` / `load_theta_state_`)."""
    out = []
    for _, layer in mixed_layers(model):
        for kind in ("w", "a"):
            theta = getattr(layer, f"theta_{kind}")
            if theta is not None and layer.mixing:
                slots = (getattr(layer, f"theta_{kind}_{k}") for k in ("m1", "m2", "step"))
                out.append((theta, *slots))
    return out


@torch.no_grad()
def save_theta_state_(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Copy theta's SGD momentum (or Adam moments and step) into the model's buffers."""
    for theta, m1, m2, step in theta_slots(model):
        state = optimizer.state.get(theta) or {}
        first = state.get("momentum_buffer", state.get("exp_avg"))
        if first is None:
            continue
        m1.copy_(first)
        if "exp_avg_sq" in state:
            m2.copy_(state["exp_avg_sq"])
        step.fill_(float(state.get("step", 1)))


@torch.no_grad()
def load_theta_state_(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """The inverse of `save_theta_state_` for a fresh optimizer over `theta_parameters(model)` (a resumed run)."""
    adam = isinstance(optimizer, torch.optim.Adam)
    for theta, m1, m2, step in theta_slots(model):
        if float(step) == 0:
            continue
        if adam:
            optimizer.state[theta] = {
                "step": torch.tensor(float(step)),
                "exp_avg": m1.clone(),
                "exp_avg_sq": m2.clone(),
            }
        else:
            optimizer.state[theta] = {"momentum_buffer": m1.clone()}


def theta_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [
        p for _, layer in mixed_layers(model) for p in (layer.theta_w, layer.theta_a) if p is not None and layer.mixing
    ]


@torch.no_grad()
def derive_(model: nn.Module, choices: Mapping[str, tuple[int, int | None]] | None = None) -> dict[str, list[int]]:
    """The derived model, in place: every mixed layer replaced by the plain FracBits layer (Form.FRAC) at its chosen
    bits (`choices`, default the argmax), hard. Returns {layer: [w_bits, a_bits or -1]}."""
    chosen = {}
    for name, layer in list(mixed_layers(model)):
        w, a = (choices or {}).get(name) or layer.argmax_bits()
        cls = FracLinear if isinstance(layer, nn.Linear) else FracConv2d
        plain = cls.from_float(layer, layer.w_range, layer.a_range, False, 0.0, 1.0, layer.variant)
        plain.rescale, plain.blend = layer.rescale, layer.blend
        state = {k: v for k, v in layer.state_dict().items() if k in plain.state_dict()}
        plain.load_state_dict(state)
        plain.wbits.fill_(w)
        if a is not None:
            plain.abits.fill_(a)
        plain.set_hard_()
        set_submodule(model, name, plain)
        chosen[name] = [int(w), -1 if a is None else int(a)]
    return chosen
