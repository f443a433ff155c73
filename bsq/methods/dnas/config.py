"""DNAS / EdMIPS' config section (methods-next.md "DNAS and EdMIPS"). Torch-free.

Sources of the defaults: EdMIPS' code (github zhaoweicai/EdMIPS @ 690a7c6: models/mixresnet.py, models/quant_module.py,
search.py, README.md), the DNAS paper (Wu et al., arXiv 1812.00090, read from memory: marked "unverified"), or ours."""

from __future__ import annotations

from dataclasses import dataclass, field

from bsq.budgets import COSTS, MATCHES, matched_cost
from bsq.checks import is_int, is_number, require
from bsq.errors import BSQError

__all__ = ["DnasConfig", "COSTS", "MATCHES", "MIXTURES", "COMPLEXITIES", "UPDATES", "THETA_OPTIMIZERS", "matched_cost"]

MIXTURES = ("softmax", "gumbel")  # EdMIPS: softmax(theta / T) | DNAS: Gumbel-softmax samples
COMPLEXITIES = ("target", "edmips")  # lam |E[C] / C_t - 1| (the suite's budget matching) | lam E[C] / C_unit (paper)
UPDATES = ("joint", "alternate")  # EdMIPS: one step for weights and theta | DNAS: theta on a held-out split
THETA_OPTIMIZERS = ("sgd", "adam")

# defaults that depend on another switch (None in the dataclass = "the default of that switch")
DEFAULT_LAM = {"target": 1.0, "edmips": 0.00335}  # target: as fracbits.kappa | EdMIPS README ResNet-18 --cd
DEFAULT_TEMPERATURE = {"softmax": 1.0, "gumbel": 5.0}  # EdMIPS plain softmax | FBNet/DNAS initial T (unverified)
DEFAULT_DECAY = {"softmax": 1.0, "gumbel": 0.956}  # per epoch: none | FBNet exp(-0.045) (unverified for DNAS)


def _candidates(value, key: str) -> list[int]:
    """A non-empty list of distinct integer bit-widths in 1..16, sorted."""
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int(v) and 1 <= v <= 16 for v in value)
    require(ok, key, "a non-empty list of integer bits in 1..16", value)
    require(len(set(value)) == len(value), key, "a list without duplicates", value)
    return sorted(int(v) for v in value)


@dataclass
class DnasConfig:
    """The differentiable mixed-precision search (EdMIPS; DNAS as switches), then argmax, then finetune, in one run.

    Defaults: EdMIPS' weight candidates {1, 2, 3, 4} (mixres18_w1234a234) with activations fixed at model.act_bits
    (the weight-only search that compares with BSQ; EdMIPS searches a_bits [2, 3, 4] too), its softmax mixture,
    joint updates and theta optimiser (SGD lr 0.01, momentum 0.9, wd 1e-4, theta filled with 0.01, search.py and
    quant_module.py), the suite's target-matching complexity term, and FracBits' search length."""

    w_bits: list[int] = field(default_factory=lambda: [1, 2, 3, 4])  # EdMIPS mixres18_w1234a234
    a_bits: list[int] | None = None  # None = model.act_bits fixed (weights only); EdMIPS: [2, 3, 4]
    mixture: str = "softmax"  # softmax (EdMIPS) | gumbel (DNAS)
    temperature: float | None = None  # None: softmax 1 (EdMIPS) | gumbel 5 (FBNet/DNAS paper, unverified)
    temperature_decay: float | None = None  # T_e = T * decay^e; None: softmax 1 | gumbel 0.956 (FBNet, unverified)
    cost: str = "size"  # size (MB, weight-only) | bitops (G, EdMIPS' cost)
    target: float | None = None  # in the cost's unit; None = from the `budget` input via `match`
    match: str = "compression"  # with a budget input: match its compression | size (MB) | bitops (G)
    complexity: str = "target"  # target: lam |E[C]/C_t - 1| (ours, as FracBits' normalised term) | edmips (paper)
    lam: float | None = None  # None: target 1 (as fracbits.kappa) | edmips 0.00335 (EdMIPS README, ResNet-18 --cd)
    updates: str = "joint"  # joint (EdMIPS search.py) | alternate (DNAS: theta steps on a held-out split)
    holdout: float = 0.2  # alternate: share of the training set held out for theta (DNAS paper 80/20, unverified)
    warmup_epochs: int = 0  # epochs before theta trains (DNAS warms the weights up; 0 = EdMIPS)
    theta_optimizer: str = "sgd"  # sgd (EdMIPS search.py arch_optimizer) | adam (DNAS/FBNet, unverified)
    theta_lr: float = 0.01  # EdMIPS --lra; decays with the weights' lr schedule, as EdMIPS' adjust_learning_rate
    theta_momentum: float = 0.9  # EdMIPS (SGD momentum); adam: beta1
    theta_weight_decay: float = 1e-4  # EdMIPS decays theta with the weights' 1e-4
    theta_init: float = 0.01  # EdMIPS alpha.fill_(0.01): uniform mixture at the start
    search_epochs: int | None = None  # None = int(0.8 E) + 1, < E (FracBits'); EdMIPS: 25 search + 95 from scratch
    repair: str = "greedy"  # argmax off budget: greedy per-layer steps to the target (ours) | none (the papers)
    tolerance: float = 0.01  # budget_met: the derived scheme within 1 % of the target (as fracbits.tolerance)

    def __post_init__(self) -> None:
        self.w_bits = _candidates(self.w_bits, "dnas.w_bits")
        if self.a_bits is not None:
            self.a_bits = _candidates(self.a_bits, "dnas.a_bits")
        for key, allowed in (
            ("mixture", MIXTURES),
            ("cost", COSTS),
            ("match", MATCHES),
            ("complexity", COMPLEXITIES),
            ("updates", UPDATES),
            ("theta_optimizer", THETA_OPTIMIZERS),
            ("repair", ("greedy", "none")),
        ):
            require(getattr(self, key) in allowed, f"dnas.{key}", " | ".join(allowed), getattr(self, key))
        positive = lambda v: v is None or (is_number(v) and v > 0)  # noqa: E731
        require(positive(self.target), "dnas.target", "null or > 0", self.target)
        require(positive(self.temperature), "dnas.temperature", "null or > 0", self.temperature)
        decay = self.temperature_decay
        require(decay is None or (is_number(decay) and 0 < decay <= 1), "dnas.temperature_decay", "in (0, 1]", decay)
        require(self.lam is None or (is_number(self.lam) and self.lam >= 0), "dnas.lam", "null or >= 0", self.lam)
        require(is_number(self.holdout) and 0 < self.holdout < 1, "dnas.holdout", "in (0, 1)", self.holdout)
        require(
            is_int(self.warmup_epochs) and self.warmup_epochs >= 0, "dnas.warmup_epochs", ">= 0", self.warmup_epochs
        )
        for key in ("theta_lr", "theta_init"):
            require(is_number(getattr(self, key)), f"dnas.{key}", "a number", getattr(self, key))
        require(self.theta_lr > 0, "dnas.theta_lr", "> 0", self.theta_lr)
        m, wd = self.theta_momentum, self.theta_weight_decay
        require(is_number(m) and 0 <= m < 1, "dnas.theta_momentum", "in [0, 1)", m)
        require(is_number(wd) and wd >= 0, "dnas.theta_weight_decay", ">= 0", wd)
        n = self.search_epochs
        require(n is None or (is_int(n) and n >= 1), "dnas.search_epochs", "null or an integer >= 1", n)
        require(is_number(self.tolerance) and 0 < self.tolerance < 1, "dnas.tolerance", "in (0, 1)", self.tolerance)

    @property
    def lam_value(self) -> float:
        return DEFAULT_LAM[self.complexity] if self.lam is None else float(self.lam)

    def temperature_at(self, epoch: int) -> float:
        t0 = DEFAULT_TEMPERATURE[self.mixture] if self.temperature is None else float(self.temperature)
        decay = DEFAULT_DECAY[self.mixture] if self.temperature_decay is None else float(self.temperature_decay)
        return t0 * decay**epoch

    def search_epochs_of(self, epochs: int) -> int:
        """Search epochs before the argmax derivation; the rest finetune the derived scheme. Default as FracBits':
        int(0.8 E) + 1, leaving at least one finetune epoch."""
        if epochs < 2:
            raise BSQError(f"DNAS needs optim.epochs >= 2 (search, then finetune), got {epochs}")
        n = min(int(0.8 * epochs) + 1, epochs - 1) if self.search_epochs is None else self.search_epochs
        if not 1 <= n < epochs:
            raise BSQError(
                f"dnas.search_epochs={n} leaves no finetune epoch of optim.epochs={epochs}; use fewer search epochs "
                "or more epochs"
            )
        if self.warmup_epochs >= n:
            raise BSQError(f"dnas.warmup_epochs={self.warmup_epochs} must be < dnas.search_epochs ({n})")
        return n
