"""MSQ's config section (methods-next.md, MSQ). Torch-free.

MSQ (ICCV 2025, arXiv 2507.22349) has no public code, so this is a labelled reconstruction. Each default says where
it comes from: "abstract" (the paper's verified abstract), "secondary" (a third-party summary, unverified) or "ours"
(a reading of our own where neither pins it down)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from bsq.budgets import MATCHES, matched_cost  # shared (re-exported here)
from bsq.checks import is_int, is_number, require
from bsq.errors import BSQError
from bsq.quant.limits import MAX_BITS

__all__ = ["MSQConfig", "MATCHES", "LEVELS", "NORMALIZE", "UNITS", "matched_cost"]

LEVELS = ("nested", "bsq")
NORMALIZE = ("model", "layer", "none")
UNITS = ("code", "value")


@dataclass
class MSQConfig:
    """Round-clamp LSB quantizer, L1 on the LSB residual, Hessian-guided multi-LSB pruning, then a finetune with the
    bits fixed, in one run."""

    init_bits: int = 8  # starting precision of every quantized weight (ours: BSQ's 8-bit start)
    min_bits: int = 1  # pruning never goes below (ours: 1, needed for the published 20x ~ 1.6 bits on ResNet-20)
    bias_bits: int | None = None  # the fc bias, fixed and never pruned; None = init_bits (ours)
    levels: str = "nested"  # 2^n steps, the (n-1)-bit grid nested (secondary) | bsq: 2^n - 1 (BSQ's grid)
    # lambda of CE + lambda * R (abstract: an L1 LSB regulariser; value ours, measured on digits ResNet-8 with 19k
    # weights: the pull per weight is lambda / (s P) with `normalize: model`, so scale it with the weight count P)
    lam: float = 100.0
    # R = sum_l sum|r_l| divided by: model = all quantized weights (ours: lambda independent of model size) |
    # layer = each layer's count (a mean per layer) | none = the raw sum (secondary's formula)
    normalize: str = "model"
    # value: r / G_n, the LSB's value on the normalised weight (ours: the same pull, 1 / s, at every n) | code: r in
    # {-1, 0, 1}, the secondary formula sum|LSB| (its pull, G_n / s, grows with 2^n while the grid step shrinks: on
    # digits, lambda 30 cost 13 points of accuracy at 8 bits and pruned nothing; value with lambda 100 kept accuracy)
    units: str = "value"
    threshold: float = 0.1  # a layer drops LSBs when its share of non-zero r is <= this (secondary; value ours)
    prune_interval: int = 10  # a pruning step at the start of every k-th epoch (abstract: periodic; k ours)
    prune_until: float = 0.8  # no pruning after this fraction of the epochs: the rest finetunes (ours)
    multi_lsb: int = 2  # LSBs a layer below the mean sensitivity drops at once (secondary)
    hessian: bool = True  # Hessian-guided multi-LSB drops (abstract); false = always 1 LSB
    hessian_batches: int = 2  # training batches of each Hutchinson estimate (ours)
    hessian_samples: int = 32  # most Rademacher samples per batch (ours; stops earlier at 5 % standard error)
    target: float | None = None  # in the unit of `match` (x, MB or G); None = from a budget input, or no budget
    match: str = "compression"  # compression (x) | size (MB) | bitops (G), of the target or the budget input
    force: bool = True  # at the last pruning step, drop LSBs of the sparsest residuals until the target (ours)
    tolerance: float = 0.01  # budget_met: the achieved cost at most this share above the target

    def __post_init__(self) -> None:
        self._check_bits()
        require(self.levels in LEVELS, "msq.levels", " or ".join(LEVELS), self.levels)
        require(self.normalize in NORMALIZE, "msq.normalize", ", ".join(NORMALIZE), self.normalize)
        require(self.units in UNITS, "msq.units", " or ".join(UNITS), self.units)
        require(is_number(self.lam) and self.lam >= 0, "msq.lam", "a number >= 0", self.lam)
        self.lam = float(self.lam)
        require(is_number(self.threshold) and 0 < self.threshold < 1, "msq.threshold", "in (0, 1)", self.threshold)
        require(
            is_int(self.prune_interval) and self.prune_interval >= 1, "msq.prune_interval", ">= 1", self.prune_interval
        )
        require(
            is_number(self.prune_until) and 0 < self.prune_until <= 1, "msq.prune_until", "in (0, 1]", self.prune_until
        )
        require(is_int(self.multi_lsb) and self.multi_lsb >= 1, "msq.multi_lsb", "an integer >= 1", self.multi_lsb)
        for key in ("hessian", "force"):
            require(isinstance(getattr(self, key), bool), f"msq.{key}", "true or false", getattr(self, key))
        for key in ("hessian_batches", "hessian_samples"):
            value = getattr(self, key)
            require(is_int(value) and value >= 1, f"msq.{key}", "an integer >= 1", value)
        require(self.match in MATCHES, "msq.match", ", ".join(MATCHES), self.match)
        ok = self.target is None or (is_number(self.target) and self.target > 0)
        require(ok, "msq.target", "null or a number > 0 (in the unit of msq.match)", self.target)
        if self.target is not None and self.match == "compression" and self.target < 1:
            raise BSQError(f"msq.target={self.target} is a compression (msq.match: compression): it must be >= 1")
        require(is_number(self.tolerance) and 0 <= self.tolerance < 1, "msq.tolerance", "in [0, 1)", self.tolerance)

    def _check_bits(self) -> None:
        require(
            is_int(self.init_bits) and 2 <= self.init_bits <= MAX_BITS,
            "msq.init_bits",
            f"an integer in 2..{MAX_BITS}",
            self.init_bits,
        )
        require(is_int(self.min_bits) and self.min_bits >= 1, "msq.min_bits", "an integer >= 1", self.min_bits)
        if self.min_bits > self.init_bits:
            raise BSQError(f"msq.min_bits={self.min_bits} must be <= msq.init_bits={self.init_bits}")
        if self.bias_bits is not None:
            ok = is_int(self.bias_bits) and 1 <= self.bias_bits <= MAX_BITS
            require(ok, "msq.bias_bits", f"null or an integer in 1..{MAX_BITS}", self.bias_bits)

    @property
    def fc_bias_bits(self) -> int:
        return self.init_bits if self.bias_bits is None else self.bias_bits

    def prune_end(self, epochs: int) -> int:
        """The last epoch at whose start pruning may run; training from it on has fixed bits (the finetune).
        int(prune_until * E), at least 1 and at most E - 1 so a finetune epoch follows."""
        if epochs < 2:
            raise BSQError(f"MSQ needs optim.epochs >= 2 (pruning, then a finetune epoch), got {epochs}")
        return min(max(1, math.floor(self.prune_until * epochs)), epochs - 1)

    def prune_epochs(self, epochs: int) -> list[int]:
        """Epochs at whose start a pruning step runs: every `prune_interval`, up to `prune_end` (always included,
        the step that forces the budget)."""
        end = self.prune_end(epochs)
        steps = list(range(self.prune_interval, end + 1, self.prune_interval))
        return steps if steps and steps[-1] == end else [*steps, end]
