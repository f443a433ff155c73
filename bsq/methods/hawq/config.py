"""HAWQ-V3's config section (methods-next.md "HAWQ-V3"). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from bsq.budgets import COSTS, MATCHES, matched_cost  # shared (re-exported here)
from bsq.checks import is_int, is_number, require

__all__ = ["HAWQConfig", "COSTS", "MATCHES", "QUANTIZERS", "matched_cost", "check_candidates"]

NEGATIVE_TRACES = ("floor", "keep")  # a trace estimate < 0: the model's least positive Tr / n | as estimated
QUANTIZERS = ("dorefa", "hawq")  # Q_b of the sensitivity: the finetune's DoReFa | HAWQ's symmetric per-channel
ACTIVATIONS = ("fixed", "same")  # a searched layer's input bits: model.act_bits | the bits the ILP gives its weights
MAX_BITS = 16


def check_candidates(value: object, key: str = "hawq.candidates") -> list[int]:
    """A non-empty set of distinct integer bit-widths in 1..16, returned sorted (the ILP's choices per layer)."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int(b) for b in value)
    require(ok, key, f"a non-empty list of integer bit-widths in 1..{MAX_BITS}", value)
    require(all(1 <= b <= MAX_BITS for b in value), key, f"bit-widths in 1..{MAX_BITS}", value)
    require(len(set(value)) == len(value), key, "distinct bit-widths (no duplicates)", value)
    return sorted(int(b) for b in value)


@dataclass
class HAWQConfig:
    """HAWQ-V3 (Yao, Dong et al., ICML 2021) on the suite's QAT models: Hessian traces of the float parent, the
    sensitivity Omega_l(b) = Tr(H_l) / n_l * ||Q_b(W_l) - W_l||^2, an ILP choosing one bit-width per searched layer
    under a size or BitOPs budget, then QAT with the scheme fixed. Each default says where it comes from."""

    candidates: list[int] = field(default_factory=lambda: [4, 8])  # Zhen-Dong/HAWQ ILP.ipynb: 4 or 8 bits per layer
    cost: str = "size"  # the budget's kind: size (MB) | bitops (G); ILP.ipynb has both (and latency: not here)
    target: float | None = None  # in the cost's unit; None = from the `budget` input (a BSQ run) via `match`
    match: str = "compression"  # with a budget input: its compression | size (MB) | bitops (G), as fracbits.match
    size_limit: float | None = None  # an extra size constraint (MB) on top of the target ("and/or", ours)
    bitops_limit: float | None = None  # an extra BitOPs constraint (G)
    hessian_batches: int = 2  # training batches the traces are averaged over (ours: the Hessian code is not public)
    samples: int = 200  # most Hutchinson samples per batch (ours; bsq.quant.hessian's default)
    min_samples: int = 8  # fewest samples before the convergence check (capped at `samples`)
    rel_tol: float = 0.05  # stop a batch when every layer's standard error is <= rel_tol of its trace (ours)
    quantizer: str = "dorefa"  # Q_b: the finetune's DoReFa weights (ours) | hawq: symmetric per-channel uniform
    # A negative trace estimate (noise, or a float model far from a minimum) makes Omega prefer *more* error: floor
    # gives the layer the smallest positive Tr / n of the model, the least sensitive layer, so more bits still
    # help it (ours); keep uses it as estimated (the formula as written; the notebook's 19 traces of a trained
    # ResNet-18 are all positive)
    negative_traces: str = "floor"
    # fixed: inputs at model.act_bits, the ILP picks weight bits (the suite's weight-only comparison with BSQ, ours);
    # same: a layer's input gets its weight bits, W4A4 / W8A8 per layer (ILP.ipynb: bops_8bit = bops / 4 / 4, the
    # zoo's "MP(4/8)" weights and activations)
    activations: str = "fixed"
    tie_shortcuts: bool = True  # a 1x1 shortcut conv takes its block's conv1 bits (ILP.ipynb: x4 == x6, ...)
    time_limit: float = 60.0  # seconds the MILP solver may take (scipy.optimize.milp's HiGHS)
    tolerance: float = 0.01  # budget_met: the achieved cost is at most (1 + tolerance) x the target

    def __post_init__(self) -> None:
        self.candidates = check_candidates(self.candidates)
        require(self.cost in COSTS, "hawq.cost", " or ".join(COSTS), self.cost)
        require(self.match in MATCHES, "hawq.match", ", ".join(MATCHES), self.match)
        require(self.quantizer in QUANTIZERS, "hawq.quantizer", " or ".join(QUANTIZERS), self.quantizer)
        require(self.activations in ACTIVATIONS, "hawq.activations", " or ".join(ACTIVATIONS), self.activations)
        require(
            self.negative_traces in NEGATIVE_TRACES,
            "hawq.negative_traces",
            " or ".join(NEGATIVE_TRACES),
            self.negative_traces,
        )
        require(
            self.quantizer != "hawq" or self.candidates[0] >= 2,
            "hawq.candidates",
            "bit-widths >= 2 with hawq.quantizer: hawq (symmetric: 2^(b-1) - 1 levels a side)",
            self.candidates,
        )
        for key in ("target", "size_limit", "bitops_limit"):
            value = getattr(self, key)
            require(value is None or (is_number(value) and value > 0), f"hawq.{key}", "null or a number > 0", value)
        for key in ("hessian_batches", "samples", "min_samples"):
            value = getattr(self, key)
            require(is_int(value) and value >= 1, f"hawq.{key}", "an integer >= 1", value)
        require(is_number(self.rel_tol) and self.rel_tol > 0, "hawq.rel_tol", "a number > 0", self.rel_tol)
        require(isinstance(self.tie_shortcuts, bool), "hawq.tie_shortcuts", "true or false", self.tie_shortcuts)
        require(is_number(self.time_limit) and self.time_limit > 0, "hawq.time_limit", "seconds > 0", self.time_limit)
        require(is_number(self.tolerance) and 0 <= self.tolerance < 1, "hawq.tolerance", "in [0, 1)", self.tolerance)

        same = {"size": self.size_limit, "bitops": self.bitops_limit}[self.cost]
        require(
            same is None,
            f"hawq.{self.cost}_limit",
            f"null when hawq.cost is {self.cost} (hawq.target is that budget; an extra limit is of the other cost)",
            same,
        )

    def limits(self, target: float) -> dict[str, tuple[float, str]]:
        """{cost kind: (limit, the key that sets it)}: the target in `cost`, plus the extra limit given."""
        out = {self.cost: (target, "hawq.target" if self.target is not None else "the budget (hawq.match input)")}
        for kind, value in (("size", self.size_limit), ("bitops", self.bitops_limit)):
            if value is not None:
                out[kind] = (float(value), f"hawq.{kind}_limit")
        return out
