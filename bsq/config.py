"""Typed, validated configuration of one stage run (pretrain, search, prune, finetune, evaluate, and the
FracBits and uniform-QAT baselines).

A stage config is plain data (a nested dict from YAML, JSON or Snakemake) turned into dataclasses here, so a typo
or a wrong value fails before anything runs, with the key and the fix in the message. Optimiser defaults are the
paper's CIFAR-10 recipes (spec §8.1); the embedded default and the experiment overlays override them.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bsq.data import DataConfig
from bsq.errors import BSQError
from bsq.presets import PRESET_NAMES, apply_preset, check_choice

__all__ = [
    "STAGES",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "BSQConfig",
    "FinetuneConfig",
    "FracBitsConfig",
    "QATConfig",
    "SpeedConfig",
    "TrackingConfig",
    "StageConfig",
    "MIN_EPOCHS",
    "check_epochs",
    "load_stage_config",
    "config_to_dict",
]

STAGES = ("pretrain", "search", "prune", "finetune", "evaluate", "fracbits", "uniform")

FRACBITS_RECIPE: dict[str, Any] = {
    "epochs": 200,
    "lr": 0.05,
    "schedule": "cosine",
    "nesterov": True,
    "weight_decay": 4e-5,
    "weight_decay_on": "weights",
}
# Paper recipes (spec §8.1): FP pretrain 350 ep (x0.1 at 150/250/325), BSQ 350 ep (x0.1 at 250),
# finetune 300 ep from lr 0.01 (x0.1 at 150/250). Prune and evaluate do not train.
RECIPES: dict[str, dict[str, Any]] = {
    "pretrain": {"epochs": 350, "lr": 0.1, "milestones": [150, 250, 325]},
    "search": {"epochs": 350, "lr": 0.1, "milestones": [250]},
    "finetune": {"epochs": 300, "lr": 0.01, "milestones": [150, 250]},
    "prune": {"epochs": 0},
    "evaluate": {"epochs": 0},
    # FracBits' official optimiser (fracbits.md §1.9: SGD Nesterov, lr 0.05 cosine, wd 4e-5 on conv/fc weights only)
    # with the spec's CIFAR length (§1.11: 200 epochs, hard assignment after epoch index 160). The uniform QAT
    # baseline trains with the same recipe, so both baselines get the same budget of epochs.
    "fracbits": FRACBITS_RECIPE,
    "uniform": FRACBITS_RECIPE,
}


# Fewest training epochs each stage can run: a search or finetune of 0 epochs would save its input unchanged under a
# new name, and FracBits needs a search epoch and a finetune epoch. Pretrain may train 0 epochs only when it imports
# a checkpoint (an input, so the stage re-checks it); prune and evaluate train nothing.
MIN_EPOCHS: dict[str, int] = {
    "pretrain": 1,
    "search": 1,
    "finetune": 1,
    "prune": 0,
    "evaluate": 0,
    "fracbits": 2,
    "uniform": 1,
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _require(ok: bool, key: str, expected: str, value: Any) -> None:
    if not ok:
        raise BSQError(f"{key} must be {expected}, got {value!r}")


@dataclass
class ModelConfig:
    """Architecture and activation quantization (spec §4): act_bits None = plain ReLU (full precision),
    4 = BSQ's default ReLU6 + 4-bit, <= 3 = PACT, >= 32 = ReLU6 without quantization."""

    arch: str = "resnet8"
    act_bits: int | None = 4
    stem_act_bits: int | None = None  # None = plain ReLU after the stem, as the official HEAD code
    width: int | None = None  # CIFAR ResNets only: channels of the first stage (16 in the paper)

    def __post_init__(self) -> None:
        from bsq.models import model_info

        _require(isinstance(self.arch, str), "model.arch", "a model name", self.arch)
        model_info(self.arch)  # unknown names fail with the list of available models
        for key in ("act_bits", "stem_act_bits", "width"):
            value = getattr(self, key)
            _require(value is None or (_is_int(value) and value >= 1), f"model.{key}", "null or an integer >= 1", value)


@dataclass
class OptimConfig:
    """SGD with momentum and a step schedule, as every BSQ recipe (spec §8.1)."""

    epochs: int = 0
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4  # also on bit planes and scales (spec P18)
    nesterov: bool = False
    schedule: str = "multistep"  # multistep | cosine | constant
    milestones: list[int] = field(default_factory=list)  # epochs where lr *= gamma (multistep)
    gamma: float = 0.1
    weight_decay_on: str = "all"  # all (BSQ: every parameter, bits included) | weights (FracBits: conv/fc weights)

    def __post_init__(self) -> None:
        _require(_is_int(self.epochs) and self.epochs >= 0, "optim.epochs", "an integer >= 0", self.epochs)
        _require(
            self.weight_decay_on in ("all", "weights"), "optim.weight_decay_on", "all or weights", self.weight_decay_on
        )
        _require(_is_number(self.lr) and self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _require(_is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        _require(
            _is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay
        )
        _require(isinstance(self.nesterov, bool), "optim.nesterov", "true or false", self.nesterov)
        _require(
            self.schedule in ("multistep", "cosine", "constant"),
            "optim.schedule",
            "one of multistep, cosine, constant",
            self.schedule,
        )
        ok = isinstance(self.milestones, (list, tuple)) and all(_is_int(m) and m > 0 for m in self.milestones)
        _require(
            ok and list(self.milestones) == sorted(self.milestones),
            "optim.milestones",
            "increasing epochs",
            self.milestones,
        )
        self.milestones = list(self.milestones)
        _require(_is_number(self.gamma) and 0 < self.gamma <= 1, "optim.gamma", "in (0, 1]", self.gamma)

    def lr_at(self, epoch: float) -> float:
        """Learning rate at `epoch`: a whole epoch (the official BSQ scripts change it only at epoch boundaries), or
        a fractional epoch e + k/S for a per-iteration schedule (FracBits' cosine, fracbits.md §1.9)."""
        if self.schedule == "multistep":
            return self.lr * self.gamma ** sum(epoch >= m for m in self.milestones)
        if self.schedule == "cosine":
            return 0.5 * self.lr * (1 + math.cos(math.pi * epoch / max(self.epochs, 1)))
        return self.lr


@dataclass
class QuantConfig:
    """Which layers become bit layers and at what starting precision (spec §1.3, §4.3, P4, P10)."""

    nbits: int = 8  # starting precision of the search (the README's --Nbits 8)
    maxbit: int = 8  # precision cap of re-quantization (hard-coded 8 in the official script, P10)
    quantize_first: bool = True
    quantize_last: bool = True
    quantize_shortcuts: bool = False  # HEAD: 1x1 shortcuts in float; true = paper-era code

    def __post_init__(self) -> None:
        from bsq.quant.convert import MAX_BITS

        for key in ("nbits", "maxbit"):
            value = getattr(self, key)
            _require(_is_int(value) and 1 <= value <= MAX_BITS, f"quant.{key}", f"an integer in 1..{MAX_BITS}", value)
        for key in ("quantize_first", "quantize_last", "quantize_shortcuts"):
            _require(isinstance(getattr(self, key), bool), f"quant.{key}", "true or false", getattr(self, key))

    def policy(self):
        from bsq.quant.convert import QuantPolicy

        return QuantPolicy(
            nbits=self.nbits,
            quantize_first=self.quantize_first,
            quantize_last=self.quantize_last,
            quantize_shortcuts=self.quantize_shortcuts,
        )


@dataclass
class BSQConfig:
    """The search's regulariser and re-quantization schedule (spec §2-3)."""

    alpha: float | str = 5e-3  # strength of alpha * R / TP; strings such as "5e-3" are accepted (Snakemake paths)
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
        raw = self.alpha
        try:
            value = float(raw)
        except (TypeError, ValueError):
            value = float("nan")
        _require(
            not isinstance(raw, bool) and math.isfinite(value) and value > 0,
            "bsq.alpha",
            "a number > 0 (the BSQ search needs a penalty; use the uniform baseline for none)",
            raw,
        )
        _require(
            _is_int(self.requant_interval) and self.requant_interval >= 1,
            "bsq.requant_interval",
            ">= 1",
            self.requant_interval,
        )
        _require(
            _is_number(self.threshold) and 0 <= self.threshold <= 100,
            "bsq.threshold",
            "a percentage in [0, 100]",
            self.threshold,
        )
        _require(self.penalty in ("group_lasso", "l1"), "bsq.penalty", "group_lasso or l1", self.penalty)
        _require(isinstance(self.reweight, bool), "bsq.reweight", "true or false", self.reweight)
        for key in ("clamp", "overflow", "prune_shares"):
            check_choice(f"bsq.{key}", getattr(self, key))

    @property
    def value(self) -> float:
        """alpha as a number; `alpha` itself keeps the spelling of the config ("5e-3"), used in labels and paths."""
        return float(self.alpha)


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


def _bit_range(value: Any, key: str, allow_zero: bool = False) -> list[int]:
    low = 0 if allow_zero else 1
    ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(_is_int(v) for v in value)
    _require(
        ok and low <= value[0] <= value[1] <= 16, key, f"[min, max] integer bits, {low} <= min <= max <= 16", value
    )
    return list(value)


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
        _require(self.cost in ("size", "bitops"), "fracbits.cost", "size or bitops", self.cost)
        _require(
            self.match in ("compression", "size", "bitops"), "fracbits.match", "compression, size or bitops", self.match
        )
        _require(
            self.target is None or (_is_number(self.target) and self.target > 0),
            "fracbits.target",
            "null or > 0",
            self.target,
        )
        _require(_is_number(self.kappa) and self.kappa > 0, "fracbits.kappa", "a number > 0", self.kappa)
        for key in ("normalize", "prune_channels"):
            _require(isinstance(getattr(self, key), bool), f"fracbits.{key}", "true or false", getattr(self, key))
        _require(self.granularity in ("layer", "kernel"), "fracbits.granularity", "layer or kernel", self.granularity)
        self.w_bits = _bit_range(self.w_bits, "fracbits.w_bits", allow_zero=True)
        if self.w_bits[0] == 0 and not self.prune_channels:
            raise BSQError("fracbits.w_bits min 0 prunes kernels: set fracbits.prune_channels: true to allow it")
        if self.prune_channels:
            self.w_bits[0] = 0
        if self.a_bits is not None:
            self.a_bits = _bit_range(self.a_bits, "fracbits.a_bits")
        _require(
            self.init_bits is None or (_is_number(self.init_bits) and 0 <= self.init_bits <= 16),
            "fracbits.init_bits",
            "null or a number of bits",
            self.init_bits,
        )
        _require(
            self.search_epochs is None or (_is_int(self.search_epochs) and self.search_epochs >= 0),
            "fracbits.search_epochs",
            "null or an integer >= 0",
            self.search_epochs,
        )
        _require(
            _is_number(self.tolerance) and 0 < self.tolerance < 1, "fracbits.tolerance", "in (0, 1)", self.tolerance
        )
        _require(
            _is_int(self.bisection_trials) and self.bisection_trials >= 1,
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
        _require(self.variant in ("sat", "pact"), "qat.variant", "sat or pact", self.variant)
        ok = self.act_bits is None or self.act_bits == "same" or (_is_int(self.act_bits) and 1 <= self.act_bits <= 32)
        _require(ok, "qat.act_bits", 'null, "same" or an integer in 1..32', self.act_bits)
        for key in ("fixed_bits", "bits"):
            value = getattr(self, key)
            _require(_is_int(value) and 1 <= value <= 16, f"qat.{key}", "an integer in 1..16", value)
        _require(
            isinstance(self.quantize_shortcuts, bool),
            "qat.quantize_shortcuts",
            "true or false",
            self.quantize_shortcuts,
        )


@dataclass
class SpeedConfig:
    """Switches that make training faster without changing a quantized value: every quantizer (bit planes to levels,
    activation rounding, FracBits' DoReFa / PACT) still runs in float32. None = on where it is safe (CUDA)."""

    channels_last: bool | None = None  # NHWC activations (and 4-d weights): faster cuDNN convolutions; None = on CUDA
    amp: str | None = None  # null | bf16: conv / linear arithmetic in bfloat16 autocast (not bit-identical: opt in)
    compile: bool = False  # torch.compile the training forward (recompiles after each re-quantization)

    def __post_init__(self) -> None:
        _require(
            self.channels_last is None or isinstance(self.channels_last, bool),
            "speed.channels_last",
            "null, true or false",
            self.channels_last,
        )
        _require(self.amp in (None, "bf16"), "speed.amp", "null or bf16 (fp16 would need loss scaling)", self.amp)
        _require(isinstance(self.compile, bool), "speed.compile", "true or false", self.compile)


@dataclass
class TrackingConfig:
    """MLflow: one run per stage job; default store is local SQLite under results/ (no server)."""

    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under results_dir/mlflow
    experiment: str | None = None  # None: bsq-repro-<dataset>-<arch>
    results_dir: str = "results"  # where the default local store lives
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (e.g. the Snakemake rule)

    def __post_init__(self) -> None:
        _require(isinstance(self.enabled, bool), "tracking.enabled", "true or false", self.enabled)
        for key in ("uri", "experiment"):
            value = getattr(self, key)
            _require(value is None or (isinstance(value, str) and value), f"tracking.{key}", "null or a string", value)
        _require(isinstance(self.tags, Mapping), "tracking.tags", "a mapping of strings", self.tags)
        self.tags = {str(k): str(v) for k, v in self.tags.items()}


@dataclass
class StageConfig:
    """Everything one stage job needs. Sections a stage does not use are ignored by it, so one resolved config
    can serve a whole pipeline."""

    stage: str = "pretrain"
    preset: str = "default"  # fidelity preset (bsq.presets): default | official-bin | official | paper-era
    method: str | None = None  # label in tables and MLflow tags; None = the stage's own, or its input's (bsq)
    # Extra labels carried to every downstream run and table row, e.g. {variant: scratch, alpha: 5e-3} for the
    # train-from-scratch baseline, whose float parent knows no alpha.
    labels: dict[str, str] = field(default_factory=dict)
    seed: int = 1
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N
    progress: bool | None = None  # tqdm bars; None = only when stderr is a terminal
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    bsq: BSQConfig = field(default_factory=BSQConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    fracbits: FracBitsConfig = field(default_factory=FracBitsConfig)
    qat: QATConfig = field(default_factory=QATConfig)
    speed: SpeedConfig = field(default_factory=SpeedConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def model_args(self) -> dict[str, Any]:
        """create_model arguments of a fresh model for this config and dataset (what checkpoints record)."""
        from bsq.data import dataset_info
        from bsq.models import model_info

        info, m = dataset_info(self.data.name), self.model
        args: dict[str, Any] = {
            "arch": m.arch,
            "num_classes": info.num_classes,
            "act_bits": m.act_bits,
            "stem_act_bits": m.stem_act_bits,
        }
        if model_info(m.arch).family == "cifar":
            args.update(in_channels=info.in_channels, width=m.width or 16)
        elif m.width is not None:
            raise BSQError(f"model.width applies to the CIFAR ResNets only, not {m.arch}; remove it")
        return args

    def __post_init__(self) -> None:
        _require(self.stage in STAGES, "stage", f"one of {', '.join(STAGES)}", self.stage)
        _require(self.preset in PRESET_NAMES, "preset", f"one of {', '.join(PRESET_NAMES)}", self.preset)
        _require(
            self.method is None or (isinstance(self.method, str) and self.method),
            "method",
            "null or a non-empty string",
            self.method,
        )
        _require(isinstance(self.labels, Mapping), "labels", "a mapping of strings", self.labels)
        self.labels = {str(k): str(v) for k, v in self.labels.items()}
        _require(_is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        ok = isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        )
        _require(ok, "device", "auto, cpu, cuda or cuda:N", self.device)
        _require(
            self.progress is None or isinstance(self.progress, bool), "progress", "null, true or false", self.progress
        )


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "quant": QuantConfig,
    "bsq": BSQConfig,
    "finetune": FinetuneConfig,
    "fracbits": FracBitsConfig,
    "qat": QATConfig,
    "speed": SpeedConfig,
    "tracking": TrackingConfig,
}


def _build(cls: type, values: Any, where: str, stage: str) -> Any:
    if not isinstance(values, Mapping):
        raise BSQError(f"{where.rstrip('.') or 'the config'} must be a mapping of keys, got {values!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise BSQError(
            f"unknown key(s) {', '.join(where + str(k) for k in unknown)} in the {stage} config. "
            f"Valid keys{' under ' + where.rstrip('.') if where else ''}: {', '.join(known)}. Check the spelling."
        )
    kwargs = {}
    for key, value in values.items():
        section = SECTIONS.get(key) if cls is StageConfig else None
        kwargs[key] = _build(section, value, f"{key}.", stage) if section else value
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a dataclass validation tripping over a wrong type
        raise BSQError(f"invalid value in the {stage} config section {where.rstrip('.') or '(top)'}: {exc}") from exc


def check_epochs(config: StageConfig, imports_checkpoint: bool | None = None) -> None:
    """Refuse a stage length the stage cannot run, so that it fails when the config is read (and the workflow's
    dry run) rather than when the job starts. `imports_checkpoint`: whether pretrain imports a checkpoint (None =
    not known yet: pretrain's own check at run time decides)."""
    stage, epochs = config.stage, config.optim.epochs
    if stage == "fracbits":
        config.fracbits.search_epochs_of(epochs)  # raises for < 2 epochs or no finetune epoch left
        return
    if stage == "pretrain" and epochs == 0:
        if imports_checkpoint is False:
            raise BSQError(
                "pretrain with optim.epochs = 0 trains nothing: give a checkpoint to import (workflow: pretrained; "
                "CLI: --import-checkpoint) or set optim.epochs >= 1"
            )
        return
    if epochs < MIN_EPOCHS[stage]:
        raise BSQError(f"the {stage} stage needs optim.epochs >= {MIN_EPOCHS[stage]}, got {epochs}")


def load_stage_config(
    stage: str,
    config: Mapping[str, Any] | StageConfig | None = None,
    *,
    imports_checkpoint: bool | None = None,
) -> StageConfig:
    """Validate `config` for `stage`, filling the stage's recipe defaults for unset optimiser keys, and check that
    the stage can run that many epochs (see check_epochs)."""
    if isinstance(config, StageConfig):
        cfg = dataclasses.replace(config, stage=stage)
    else:
        cfg = _build(StageConfig, _with_recipe(stage, config), "", stage)
    check_epochs(cfg, imports_checkpoint)
    return cfg


def _with_recipe(stage: str, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """A copy of `config` for `stage` whose unset optimiser keys take the stage's recipe."""
    if stage not in STAGES:
        raise BSQError(f"unknown stage {stage!r}; stages are {', '.join(STAGES)}")
    values = copy.deepcopy(dict(config or {}))
    if values.get("stage", stage) != stage:
        raise BSQError(f"this config is for stage {values['stage']!r}, not {stage!r}")
    values["stage"] = stage
    values = apply_preset(values)  # the preset's switch values where the config sets none
    optim = values.get("optim", {})
    if isinstance(optim, Mapping):
        values["optim"] = {**RECIPES[stage], **optim}
    return values


def config_to_dict(config: StageConfig) -> dict[str, Any]:
    """Plain nested dict (JSON-safe) of a resolved config: what checkpoints, MLflow params and hashes record."""
    return dataclasses.asdict(config)
