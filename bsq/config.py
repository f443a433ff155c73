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

from bsq.checks import is_int, is_number, require
from bsq.datasets import DataConfig, dataset_info
from bsq.errors import BSQError
from bsq.methods import all_stages, config_sections
from bsq.model_catalog import model_spec
from bsq.presets import PRESET_NAMES, apply_preset
from bsq.quant.limits import MAX_BITS

__all__ = [
    "stages",
    "ModelConfig",
    "OptimConfig",
    "QuantConfig",
    "SpeedConfig",
    "TrackingConfig",
    "StageConfig",
    "check_epochs",
    "load_stage_config",
    "config_to_dict",
]


def stages() -> tuple[str, ...]:
    """Every stage name: the generic pretrain and evaluate, and each registered method's (bsq.methods)."""
    return tuple(all_stages())


@dataclass
class ModelConfig:
    """Architecture and activation quantization (spec §4): act_bits None = plain ReLU (full precision),
    4 = BSQ's default ReLU6 + 4-bit, <= 3 = PACT, >= 32 = ReLU6 without quantization."""

    arch: str = "resnet8"
    act_bits: int | None = 4
    stem_act_bits: int | None = None  # None = plain ReLU after the stem, as the official HEAD code
    width: int | None = None  # CIFAR ResNets only: channels of the first stage (16 in the paper)

    def __post_init__(self) -> None:
        require(isinstance(self.arch, str), "model.arch", "a model name", self.arch)
        model_spec(self.arch)  # unknown names fail with the list of available models
        for key in ("act_bits", "stem_act_bits", "width"):
            value = getattr(self, key)
            require(value is None or (is_int(value) and value >= 1), f"model.{key}", "null or an integer >= 1", value)


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
        require(is_int(self.epochs) and self.epochs >= 0, "optim.epochs", "an integer >= 0", self.epochs)
        require(
            self.weight_decay_on in ("all", "weights"), "optim.weight_decay_on", "all or weights", self.weight_decay_on
        )
        require(is_number(self.lr) and self.lr > 0, "optim.lr", "a number > 0", self.lr)
        require(is_number(self.momentum) and 0 <= self.momentum < 1, "optim.momentum", "in [0, 1)", self.momentum)
        require(
            is_number(self.weight_decay) and self.weight_decay >= 0, "optim.weight_decay", ">= 0", self.weight_decay
        )
        require(isinstance(self.nesterov, bool), "optim.nesterov", "true or false", self.nesterov)
        require(
            self.schedule in ("multistep", "cosine", "constant"),
            "optim.schedule",
            "one of multistep, cosine, constant",
            self.schedule,
        )
        ok = isinstance(self.milestones, (list, tuple)) and all(is_int(m) and m > 0 for m in self.milestones)
        require(
            ok and list(self.milestones) == sorted(self.milestones),
            "optim.milestones",
            "increasing epochs",
            self.milestones,
        )
        self.milestones = list(self.milestones)
        require(is_number(self.gamma) and 0 < self.gamma <= 1, "optim.gamma", "in (0, 1]", self.gamma)

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
        for key in ("nbits", "maxbit"):
            value = getattr(self, key)
            require(is_int(value) and 1 <= value <= MAX_BITS, f"quant.{key}", f"an integer in 1..{MAX_BITS}", value)
        for key in ("quantize_first", "quantize_last", "quantize_shortcuts"):
            require(isinstance(getattr(self, key), bool), f"quant.{key}", "true or false", getattr(self, key))

    def policy(self):
        from bsq.quant.convert import QuantPolicy

        return QuantPolicy(
            nbits=self.nbits,
            quantize_first=self.quantize_first,
            quantize_last=self.quantize_last,
            quantize_shortcuts=self.quantize_shortcuts,
        )


@dataclass
class SpeedConfig:
    """Switches that make training faster without changing a quantized value: every quantizer (bit planes to levels,
    activation rounding, FracBits' DoReFa / PACT) still runs in float32. None = on where it is safe (CUDA)."""

    channels_last: bool | None = None  # NHWC activations (and 4-d weights): faster cuDNN convolutions; None = on CUDA
    amp: str | None = None  # null | bf16: conv / linear arithmetic in bfloat16 autocast (not bit-identical: opt in)
    compile: bool = False  # torch.compile the training forward (recompiles after each re-quantization)

    def __post_init__(self) -> None:
        require(
            self.channels_last is None or isinstance(self.channels_last, bool),
            "speed.channels_last",
            "null, true or false",
            self.channels_last,
        )
        require(self.amp in (None, "bf16"), "speed.amp", "null or bf16 (fp16 would need loss scaling)", self.amp)
        require(isinstance(self.compile, bool), "speed.compile", "true or false", self.compile)


@dataclass
class TrackingConfig:
    """MLflow: one run per stage job; default store is local SQLite under results/ (no server)."""

    enabled: bool = True
    uri: str | None = None  # None: $MLFLOW_TRACKING_URI, else sqlite under results_dir/mlflow
    experiment: str | None = None  # None: bsq-repro-<dataset>-<arch> (the workflow: the config's `name`)
    results_dir: str = "results"  # where the default local store lives
    tags: dict[str, str] = field(default_factory=dict)  # extra run tags (e.g. the Snakemake rule)
    log_model: bool = True  # attach the job's final checkpoint(s) to its run (model/model.pt); false for huge models

    def __post_init__(self) -> None:
        require(isinstance(self.enabled, bool), "tracking.enabled", "true or false", self.enabled)
        require(isinstance(self.log_model, bool), "tracking.log_model", "true or false", self.log_model)
        for key in ("uri", "experiment"):
            value = getattr(self, key)
            require(value is None or (isinstance(value, str) and value), f"tracking.{key}", "null or a string", value)
        require(isinstance(self.tags, Mapping), "tracking.tags", "a mapping of strings", self.tags)
        self.tags = {str(k): str(v) for k, v in self.tags.items()}


class _StageMethods:
    """Behaviour of `StageConfig` (whose fields are assembled below from the core sections and the registry's)."""

    def model_args(self) -> dict[str, Any]:
        """create_model arguments of a fresh model for this config and dataset (what checkpoints record)."""
        info, m = dataset_info(self.data.name), self.model
        args: dict[str, Any] = {
            "arch": m.arch,
            "num_classes": info.num_classes,
            "act_bits": m.act_bits,
            "stem_act_bits": m.stem_act_bits,
        }
        if model_spec(m.arch).family == "cifar":
            args.update(in_channels=info.in_channels, width=m.width or 16)
        elif m.width is not None:
            raise BSQError(f"model.width applies to the CIFAR ResNets only, not {m.arch}; remove it")
        return args

    def __post_init__(self) -> None:
        names = stages()
        require(self.stage in names, "stage", f"one of {', '.join(names)}", self.stage)
        require(self.preset in PRESET_NAMES, "preset", f"one of {', '.join(PRESET_NAMES)}", self.preset)
        require(
            self.method is None or (isinstance(self.method, str) and self.method),
            "method",
            "null or a non-empty string",
            self.method,
        )
        require(isinstance(self.labels, Mapping), "labels", "a mapping of strings", self.labels)
        self.labels = {str(k): str(v) for k, v in self.labels.items()}
        require(is_int(self.seed) and self.seed >= 0, "seed", "an integer >= 0", self.seed)
        ok = isinstance(self.device, str) and (
            self.device in ("auto", "cpu", "cuda") or (self.device.startswith("cuda:") and self.device[5:].isdigit())
        )
        require(ok, "device", "auto, cpu, cuda or cuda:N", self.device)
        require(
            self.progress is None or isinstance(self.progress, bool), "progress", "null, true or false", self.progress
        )


_SCALARS: list[tuple[str, type, Any]] = [
    ("stage", str, field(default="pretrain")),
    ("preset", str, field(default="default")),  # fidelity preset (bsq.presets): default | official-bin | ...
    ("method", "str | None", field(default=None)),  # table / MLflow label; None = the stage's own or its input's
    # Extra labels carried to every downstream run and table row, e.g. {variant: scratch, alpha: 5e-3} for the
    # train-from-scratch baseline, whose float parent knows no alpha; the workflow puts each point's labels here.
    ("labels", "dict[str, str]", field(default_factory=dict)),
    ("seed", int, field(default=1)),
    ("device", str, field(default="auto")),  # auto (cuda when available) | cpu | cuda | cuda:N
    ("progress", "bool | None", field(default=None)),  # tqdm bars; None = only when stderr is a terminal
]
# Sections: the shared ones, each registered method's (bsq.methods), then the run's machinery.
SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "quant": QuantConfig,
    **config_sections(),
    "speed": SpeedConfig,
    "tracking": TrackingConfig,
}
StageConfig = dataclasses.make_dataclass(
    "StageConfig",
    _SCALARS + [(name, cls, field(default_factory=cls)) for name, cls in SECTIONS.items()],
    bases=(_StageMethods,),
)
StageConfig.__module__ = __name__  # pickles and reprs name this module
StageConfig.__doc__ = """Everything one stage job needs: the scalars above, the shared sections and one section per
registered method. Sections a stage does not use are ignored by it, so one resolved config can serve a whole
pipeline."""


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
    spec = all_stages()[stage]
    if spec.check is not None:
        spec.check(config)  # the method's own length checks (e.g. FracBits: a search and a finetune epoch)
    if stage == "pretrain" and epochs == 0:
        if imports_checkpoint is False:
            raise BSQError(
                "pretrain with optim.epochs = 0 trains nothing: give a checkpoint to import (workflow: pretrained; "
                "CLI: --import-checkpoint) or set optim.epochs >= 1"
            )
        return
    fewest = spec.min_epochs
    if epochs < fewest:
        raise BSQError(f"the {stage} stage needs optim.epochs >= {fewest}, got {epochs}")


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
    if stage not in all_stages():
        raise BSQError(f"unknown stage {stage!r}; stages are {', '.join(stages())}")
    values = copy.deepcopy(dict(config or {}))
    if values.get("stage", stage) != stage:
        raise BSQError(f"this config is for stage {values['stage']!r}, not {stage!r}")
    values["stage"] = stage
    values = apply_preset(values)  # the preset's switch values where the config sets none
    optim = values.get("optim", {})
    if isinstance(optim, Mapping):
        values["optim"] = {**all_stages()[stage].recipe, **optim}
    return values


def config_to_dict(config: StageConfig) -> dict[str, Any]:
    """Plain nested dict (JSON-safe) of a resolved config: what checkpoints, MLflow params and hashes record."""
    return dataclasses.asdict(config)
