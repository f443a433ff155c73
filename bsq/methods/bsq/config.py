"""BSQ's config sections: the search (`bsq`) and the finetune switches (`finetune`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from bsq.checks import is_int, is_number, require
from bsq.presets import check_choice

__all__ = ["BSQConfig", "FinetuneConfig"]


@dataclass
class BSQConfig:
    """The search's regulariser and re-quantization schedule (spec §2-3)."""

    alpha: float = 5e-3  # strength of alpha * R / TP; a numeric string ("5e-3", as YAML 1.1 reads it) becomes a float
    requant_interval: int = 100  # Prun_Int: re-quantize at the start of every epoch e with e % interval == 0
    threshold: float = 0.0  # percent of weights with a bit set below which MSB/LSB planes go (final pass uses 0)
    penalty: str = "group_lasso"  # group_lasso (BSQ) | l1 (element-wise ablation)
    reweight: bool = True  # the P_l N_l / TP memory weighting of Eq. 5
    # Fidelity switches (bsq.presets): after each step clamp the planes | every non-scale non-bn param (authors'
    # --bin) | nothing (authors' float start); overflow at re-quantization adds a bit | saturates (paper-era code);
    # pruning with threshold > 0 recomputes the bit shares after each MSB fold | computes them once (authors).
    clamp: str = "planes"
    overflow: str = "grow"
    prune_shares: str = "recompute"

    def __post_init__(self) -> None:
        self.alpha = _number_or_text(self.alpha)
        require(
            is_number(self.alpha) and self.alpha > 0,
            "bsq.alpha",
            "a number > 0 (the BSQ search needs a penalty; use the uniform baseline for none)",
            self.alpha,
        )
        self.alpha = float(self.alpha)
        require(
            is_int(self.requant_interval) and self.requant_interval >= 1,
            "bsq.requant_interval",
            ">= 1",
            self.requant_interval,
        )
        require(
            is_number(self.threshold) and 0 <= self.threshold <= 100,
            "bsq.threshold",
            "a percentage in [0, 100]",
            self.threshold,
        )
        require(self.penalty in ("group_lasso", "l1"), "bsq.penalty", "group_lasso or l1", self.penalty)
        require(isinstance(self.reweight, bool), "bsq.reweight", "true or false", self.reweight)
        for key in ("clamp", "overflow", "prune_shares"):
            check_choice(f"bsq.{key}", getattr(self, key))

    @property
    def grows(self) -> bool:
        """Whether re-quantization adds a bit on overflow (HEAD) rather than saturating (paper-era code)."""
        return self.overflow == "grow"


def _number_or_text(value: object) -> object:
    """A numeric string as its float; anything else unchanged (and then refused with the key in the message)."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


@dataclass
class FinetuneConfig:
    """Fidelity switches of the finetune stage (spec §5, bsq.md §5.2 erratum; values per preset in bsq.presets)."""

    clamp: str = "latent"  # latent: quantized latent weights to [-1, 1] | official: every `weight` but not `bn`
    fc_bias: str = "train"  # train | drop (the authors' to_finetune sets pbias = None: no bias in the forward)
    best_includes_start: bool = False  # the authors count the epoch-0 (pruned, not finetuned) state as a candidate
    zeroed_layers: str = "zero"  # train from scratch: a layer BSQ zeroed stays 0 | ternary (N = 1 from float)

    def __post_init__(self) -> None:
        for key in ("clamp", "fc_bias", "best_includes_start", "zeroed_layers"):
            check_choice(f"finetune.{key}", getattr(self, key))
