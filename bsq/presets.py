"""Fidelity switches and the presets that set them as a group (issue 16).

Every known behaviour where the project and the authors' code (yanghr/BSQ HEAD 9f09b62, deJQK/FracBits 9a900bb)
differ is a config switch; a preset is a named group of switch values. A preset fills only the keys the config
leaves unset, so `preset: official-bin` plus `bsq: {clamp: planes}` is the authors' recipe with one change.

- `default`: the project's cleaned-up behaviour (clamp the planes only, train the fc bias, ...).
- `official-bin`: the authors' README recipe, run with `--bin` (spec bsq.md §1.2 P2, §5.2 erratum): the
  preset the paper overlays use.
- `official`: the authors' float-start path (no `--bin`): as official-bin, but nothing clamped in the search.
- `paper-era`: official-bin plus the code of the paper's time (the commit before precision increase): no +1 bit
  on re-quantization, quantized 1x1 shortcuts, ReLU6 + 8-bit activations after the stem.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from bsq.errors import BSQError

__all__ = ["PRESETS", "PRESET_NAMES", "SWITCHES", "apply_preset", "check_choice", "switch_values"]

# Every switch: dotted config key -> its valid values (strings steer control flow; booleans are on/off).
SWITCHES: dict[str, tuple[Any, ...]] = {
    "bsq.clamp": ("planes", "official-bin", "none"),  # which parameters go to [0, 2] after each search step
    "bsq.overflow": ("grow", "saturate"),  # re-quantization above 2^N-1: +1 bit (HEAD) or saturate (paper-era)
    "bsq.prune_shares": ("recompute", "once"),  # threshold > 0: bit shares after each MSB fold, or once (authors)
    "finetune.clamp": ("latent", "official"),  # latent weights only, or every `weight` but not `bn` to [-1, 1]
    "finetune.fc_bias": ("train", "drop"),  # the authors' to_finetune drops the fc bias (bsq.md §5.2 erratum)
    "finetune.best_includes_start": (False, True),  # epoch 0 (pruned, not finetuned) as a best-epoch candidate
    "finetune.zeroed_layers": ("zero", "ternary"),  # scratch: a 0-bit layer stays 0, or N = 1 from float (authors)
    "quant.quantize_shortcuts": (False, True),  # 1x1 shortcut convs in float (HEAD) or bit layers (paper-era)
    "model.stem_act_bits": (None, 8),  # plain ReLU after the stem (HEAD) or ReLU6 + 8 bits (paper-era)
    "fracbits.blend": ("floor", "ceil"),  # fractional blend of floor(lambda) with floor + 1 (ours) or ceil (authors)
    "fracbits.best_epoch": ("after_freeze", "all"),  # best-epoch candidates: after the hard assignment, or every epoch
    "fracbits.lr_step": ("epoch", "iteration"),  # the lr schedule's value set at each epoch, or at each iteration
    "fracbits.bisection": ("extended", "official"),  # hard-assignment offset search: ours, or the authors' exactly
    "fracbits.project": ("step", "none"),  # lambda clamped to its range after each step, or only where it is used
}

_OFFICIAL_BIN: dict[str, Any] = {
    "bsq.clamp": "official-bin",
    "bsq.overflow": "grow",
    "bsq.prune_shares": "once",
    "finetune.clamp": "official",
    "finetune.fc_bias": "drop",
    "finetune.best_includes_start": True,
    "finetune.zeroed_layers": "ternary",
    "quant.quantize_shortcuts": False,
    "model.stem_act_bits": None,
    "fracbits.blend": "ceil",
    "fracbits.best_epoch": "all",
    "fracbits.lr_step": "iteration",
    "fracbits.project": "none",
    "fracbits.bisection": "official",
}

PRESETS: dict[str, dict[str, Any]] = {
    "default": {
        "bsq.clamp": "planes",
        "bsq.overflow": "grow",
        "bsq.prune_shares": "recompute",
        "finetune.clamp": "latent",
        "finetune.fc_bias": "train",
        "finetune.best_includes_start": False,
        "finetune.zeroed_layers": "zero",
        "quant.quantize_shortcuts": False,
        "model.stem_act_bits": None,
        "fracbits.blend": "floor",
        "fracbits.best_epoch": "after_freeze",
        "fracbits.lr_step": "epoch",
        "fracbits.project": "step",
        "fracbits.bisection": "extended",
    },
    "official-bin": _OFFICIAL_BIN,
    "official": {**_OFFICIAL_BIN, "bsq.clamp": "none"},
    "paper-era": {
        **_OFFICIAL_BIN,
        "bsq.overflow": "saturate",
        "quant.quantize_shortcuts": True,
        "model.stem_act_bits": 8,
    },
}
PRESET_NAMES = tuple(PRESETS)


def check_choice(key: str, value: Any) -> None:
    """One clear error naming the valid values of switch `key` (checked where the dataclass validates)."""
    valid = SWITCHES[key]
    if not any(value is v or (type(value) is type(v) and value == v) for v in valid):
        raise BSQError(f"{key} must be one of {', '.join(_show(v) for v in valid)}, got {value!r}")


def _show(value: Any) -> str:
    return "null" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def switch_values(config: Mapping[str, Any]) -> dict[str, Any]:
    """Every switch's value in a resolved stage config (`config_to_dict`): what a run records beside its preset,
    so a reader sees the exact behaviour even where a switch was set against its preset."""
    return {dotted: config[dotted.split(".")[0]][dotted.split(".")[1]] for dotted in SWITCHES}


def apply_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a raw stage config with the preset's switch values filled in wherever the config sets none;
    an unknown preset name fails here, before any model or job exists."""
    out = copy.deepcopy(dict(values))
    name = out.setdefault("preset", "default")
    if name not in PRESETS:
        raise BSQError(f"unknown preset {name!r}; valid presets: {', '.join(PRESET_NAMES)}")
    for dotted, value in PRESETS[name].items():
        section, key = dotted.split(".")
        current = out.setdefault(section, {})
        if isinstance(current, Mapping):  # a non-mapping section fails with its own message when built
            out[section] = {key: copy.deepcopy(value), **current}
    return out
