"""The quantizer section shared by the DoReFa / PACT methods (FracBits and uniform QAT, fracbits.md §1.4-1.5).
Torch-free: a config dataclass only; the quantizers are shared arithmetic in `bsq.quant.frac`, and the model
building both methods share (policy, layer swapping) is in `bsq.quant.qat`."""

from __future__ import annotations

from dataclasses import dataclass

from bsq.checks import is_int, require

__all__ = ["QATConfig", "QAT_RECIPE"]

# FracBits' official optimiser (fracbits.md §1.9: SGD Nesterov, lr 0.05 cosine, wd 4e-5 on conv/fc weights only) with
# the spec's CIFAR length (§1.11: 200 epochs, hard assignment after epoch index 160). Uniform QAT trains with the same
# recipe, so both baselines get the same budget of epochs.
QAT_RECIPE = {
    "epochs": 200,
    "lr": 0.05,
    "schedule": "cosine",
    "nesterov": True,
    "weight_decay": 4e-5,
    "weight_decay_on": "weights",
}


@dataclass
class QATConfig:
    """Quantizers of the FracBits and uniform-QAT baselines (fracbits.md §1.4-1.5): DoReFa weights, PACT inputs."""

    variant: str = "sat"  # sat (the authors' default: calibrated PACT gradient + last-layer rescale) | pact
    fixed_bits: int = 8  # weights of the first conv and the last linear (and the first conv's 8-bit image input)
    quantize_shortcuts: bool = True  # FracBits searches the 1x1 shortcut convs too
    bits: int = 4  # uniform QAT: weight bits of every other layer
    # uniform QAT: activation bits; null = model.act_bits (the activations BSQ and FracBits get), "same" = `bits`
    # (the WbAb rows of the PACT / DoReFa / SAT papers), or an integer
    act_bits: int | str | None = None

    def __post_init__(self) -> None:
        require(self.variant in ("sat", "pact"), "qat.variant", "sat or pact", self.variant)
        ok = self.act_bits is None or self.act_bits == "same" or (is_int(self.act_bits) and 1 <= self.act_bits <= 32)
        require(ok, "qat.act_bits", 'null, "same" or an integer in 1..32', self.act_bits)
        for key in ("fixed_bits", "bits"):
            value = getattr(self, key)
            require(is_int(value) and 1 <= value <= 16, f"qat.{key}", "an integer in 1..16", value)
        require(
            isinstance(self.quantize_shortcuts, bool),
            "qat.quantize_shortcuts",
            "true or false",
            self.quantize_shortcuts,
        )
