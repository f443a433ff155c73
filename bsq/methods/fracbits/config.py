"""FracBits' config section (fracbits.md §1.3-1.8). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field

from bsq.budgets import COSTS, MATCHES, matched_cost  # shared (re-exported here)
from bsq.checks import bit_range, is_int, is_number, require
from bsq.errors import BSQError
from bsq.presets import check_choice

__all__ = ["FracBitsConfig", "COSTS", "MATCHES", "matched_cost"]


@dataclass
class FracBitsConfig:
    """FracBits' search (fracbits.md §1.3-1.8): fractional bit-widths pulled to a cost target, then a hard
    assignment and a finetune in the same run. Defaults: the weight-only size search that compares with BSQ on
    CIFAR (activations fixed at model.act_bits), kappa 1, the official +0.5 initialisation and 80 % search."""

    cost: str = "size"  # size (MB, weight-only) | bitops (G, weights and activations)
    target: float | None = None  # in the cost's unit; None = from the `budget` input (a BSQ run) via `match`
    match: str = "compression"  # with a budget input: match its compression | size (MB) | bitops (G)
    kappa: float = 1.0
    normalize: bool = True  # kappa |C/C_t - 1| (our deviation for CIFAR, §1.6); false = official kappa |C - C_t|
    granularity: str = "layer"  # layer | kernel (one weight bit-width per output kernel, §1.8)
    w_bits: list[int] = field(default_factory=lambda: [1, 8])  # searched weight range [min, max]
    a_bits: list[int] | None = None  # searched activation range; None = fixed at model.act_bits
    prune_channels: bool = False  # allow 0-bit kernels (w_bits min 0): pruning through FracBits (§1.8)
    init_bits: float | None = None  # None = uniform-equivalent bits of the target + 0.5 (the official configs)
    search_epochs: int | None = None  # None = int(0.8 * epochs) + 1 (the official 121 of 150), < epochs
    tolerance: float = 0.01  # the rounded policy must cost within 1 % of the target
    bisection_trials: int = 10
    blend: str = "floor"  # fractional blend: floor(lambda) and floor + 1 (ours) | floor and ceil(lambda) (authors)
    best_epoch: str = "after_freeze"  # best-epoch candidates: after the hard assignment (ours) | all (authors, §1.7)
    lr_step: str = "epoch"  # cosine lr set once per epoch (ours) | every iteration (authors, fracbits.md §1.9)
    project: str = "step"  # lambda clamped to its range after each step (ours) | none: only at use (authors, §1.3)
    # hard assignment: [-1, 0] first, bracketed further when needed, closest trial kept (ours) | official: [-1, 0]
    # only, the last trial kept (the authors' train.py, fracbits.md §1.7)
    bisection: str = "extended"

    def __post_init__(self) -> None:
        for key in ("blend", "best_epoch", "lr_step", "project", "bisection"):
            check_choice(f"fracbits.{key}", getattr(self, key))
        require(self.cost in COSTS, "fracbits.cost", " or ".join(COSTS), self.cost)
        require(self.match in MATCHES, "fracbits.match", ", ".join(MATCHES), self.match)
        require(
            self.target is None or (is_number(self.target) and self.target > 0),
            "fracbits.target",
            "null or > 0",
            self.target,
        )
        require(is_number(self.kappa) and self.kappa > 0, "fracbits.kappa", "a number > 0", self.kappa)
        for key in ("normalize", "prune_channels"):
            require(isinstance(getattr(self, key), bool), f"fracbits.{key}", "true or false", getattr(self, key))
        require(self.granularity in ("layer", "kernel"), "fracbits.granularity", "layer or kernel", self.granularity)
        self.w_bits = bit_range(self.w_bits, "fracbits.w_bits", allow_zero=True)
        if self.w_bits[0] == 0 and not self.prune_channels:
            raise BSQError("fracbits.w_bits min 0 prunes kernels: set fracbits.prune_channels: true to allow it")
        if self.prune_channels:
            self.w_bits[0] = 0
        if self.a_bits is not None:
            self.a_bits = bit_range(self.a_bits, "fracbits.a_bits")
        require(
            self.init_bits is None or (is_number(self.init_bits) and 0 <= self.init_bits <= 16),
            "fracbits.init_bits",
            "null or a number of bits",
            self.init_bits,
        )
        require(
            self.search_epochs is None or (is_int(self.search_epochs) and self.search_epochs >= 0),
            "fracbits.search_epochs",
            "null or an integer >= 0",
            self.search_epochs,
        )
        require(is_number(self.tolerance) and 0 < self.tolerance < 1, "fracbits.tolerance", "in (0, 1)", self.tolerance)
        require(
            is_int(self.bisection_trials) and self.bisection_trials >= 1,
            "fracbits.bisection_trials",
            "an integer >= 1",
            self.bisection_trials,
        )

    def search_epochs_of(self, epochs: int) -> int:
        """Epochs with fractional bits before the hard assignment (the rest finetune the fixed policy). Default:
        int(0.8 E) + 1, the official 121 of 150, but always leaving at least one finetune epoch."""
        if epochs < 2:
            raise BSQError(f"FracBits needs optim.epochs >= 2 (search, then finetune), got {epochs}")
        n = min(int(0.8 * epochs) + 1, epochs - 1) if self.search_epochs is None else self.search_epochs
        if not 0 <= n < epochs:
            raise BSQError(
                f"fracbits.search_epochs={n} leaves no finetune epoch of optim.epochs={epochs}; use fewer search "
                "epochs or more epochs"
            )
        return n

    def best_after_of(self, search_epochs: int) -> int:
        """First epoch that may be the kept best (Trainer.best_after). The authors keep the best test epoch of the
        whole run (fracbits.md §1.7 step 5), a search epoch with fractional bits included; ours counts only the
        discrete models after the hard assignment."""
        return search_epochs if self.best_epoch == "after_freeze" else 0
