"""Self-describing checkpoints: every file rebuilds its model alone (architecture, quantization policy, per-layer
precisions, form), says where it came from (resolved config, labels, lineage of MLflow runs, library version) and,
for resume files, carries the optimizer, epoch, history and RNG state. Writes are atomic, so a crash never leaves a
half-written file where a finished one is expected.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any

import torch
from torch import nn

import bsq
from bsq.atomic import atomic_write
from bsq.errors import BSQError

__all__ = [
    "FORMAT",
    "Form",
    "ForeignCheckpoint",
    "save_checkpoint",
    "load_checkpoint",
    "model_form",
    "layer_precisions",
    "make_checkpoint",
    "build_model",
    "load_model",
]

FORMAT = "bsq-repro-checkpoint"
FORMAT_VERSION = 1


class Form(StrEnum):
    """What a checkpoint's model is: its saved `form` string (the values are what files hold, so old checkpoints
    load as they are). A `Form` compares equal to its string."""

    FLOAT = "float"  # no quantized layers
    BITS = "bits"  # BSQ bit planes (search, prune)
    LATENT = "latent"  # BSQ's finetune form: V = sum (p - n) e with its precisions frozen
    FRAC = "frac"  # FracBits / uniform-QAT layers


class ForeignCheckpoint(BSQError):
    """A readable file that is not a bsq-repro checkpoint (e.g. one of the authors' own files)."""


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over `path` (atomic on POSIX)."""
    return atomic_write(path, lambda handle: torch.save(payload, handle), binary=True, fsync=True)


def non_finite_tensors(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding NaN or infinity."""
    return [
        name
        for name, value in state.items()
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a bsq-repro checkpoint on CPU (`weights_only`, so no code runs); errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise BSQError(f"checkpoint not found: {path}. Run the upstream stage first or fix the path.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, foreign pickle, ...
        raise BSQError(
            f"cannot read checkpoint {path}: {exc}. The file is corrupt or incomplete: delete it and re-run the "
            "stage that writes it."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        hint = ""
        if isinstance(ckpt, dict) and "state_dict" in ckpt:
            hint = (
                " It looks like a checkpoint of the authors' code: import it with `bsq pretrain --import-checkpoint` "
                "or evaluate it with `bsq evaluate --checkpoint PATH --arch ARCH`."
            )
        raise ForeignCheckpoint(f"{path} is not a bsq-repro checkpoint.{hint}")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise BSQError(f"{path} was written by a newer bsq-repro ({ckpt.get('bsq_version')}); upgrade the package")
    bad = non_finite_tensors(ckpt.get("state_dict") or {})
    if bad:
        raise BSQError(
            f"{path} holds NaN or infinite values in {len(bad)} tensor(s) ({', '.join(bad[:4])}): the "
            f"{ckpt.get('stage', 'upstream')} run that wrote it diverged. Re-run that stage with a lower optim.lr "
            "(or bsq.alpha for a search); nothing downstream can use this file."
        )
    return ckpt


def model_form(model: nn.Module) -> Form | str:
    """FLOAT (no quantized layers), FRAC (FracBits / uniform-QAT layers), the common form of the BSQ bit
    layers (BITS or LATENT), or a method's own training form: the `checkpoint_form` its layers carry
    (`Method.forms`: CSQ's gated planes, MSQ's LSB layers, a DNAS super-network)."""
    from bsq.quant.convert import bit_layers
    from bsq.quant.frac import frac_layers

    forms = {layer.form for _, layer in bit_layers(model)} | {layer.form for _, layer in frac_layers(model)}
    forms |= {form for _, form, _ in _method_form_layers(model)}
    if not forms:
        return Form.FLOAT
    if len(forms) > 1:
        raise BSQError(f"bit layers are in mixed forms {sorted(forms)}; convert them all with set_form_ first")
    form = forms.pop()
    return Form(form) if form in {f.value for f in Form} else form


def _method_form_layers(model: nn.Module):
    """(name, form, layer) of the layers of a method's own form (a class attribute `checkpoint_form`)."""
    for name, module in model.named_modules():
        form = getattr(type(module), "checkpoint_form", None)
        if isinstance(form, str):
            yield name, form, module


def layer_precisions(model: nn.Module) -> dict[str, int]:
    """The stored N of every quantized tensor (0 allowed in latent form), keyed like a scheme; for FracBits layers
    the scheme of `frac_scheme` (weight bits, and `<layer>.act` input bits); for a method's own layers what their
    `precisions()` reports (suffix -> N)."""
    from bsq.quant.convert import bit_layers
    from bsq.quant.frac import frac_layers, frac_scheme

    if any(True for _ in frac_layers(model)):
        return frac_scheme(model)
    out: dict[str, int] = {}
    for name, layer in bit_layers(model):
        out[name] = int(layer.nbits)
        if layer.has_bias:
            out[f"{name}.bias"] = int(layer.bias_nbits)
    for name, _, layer in _method_form_layers(model):
        if hasattr(layer, "precisions"):
            out.update({f"{name}{suffix}": int(n) for suffix, n in layer.precisions().items()})
    return out


def make_checkpoint(
    model: nn.Module,
    *,
    stage: str,
    model_args: dict[str, Any],
    policy: dict[str, Any] | None,
    config: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    lineage: list[dict[str, Any]] | None = None,
    metrics: dict[str, Any] | None = None,
    epoch: int | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Payload for `save_checkpoint`; the state is copied to CPU so the file loads anywhere."""
    model = getattr(model, "module", model)  # unwrap DDP
    form = model_form(model)
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "bsq_version": bsq.__version__,
        "torch_version": str(torch.__version__),
        "stage": stage,
        "form": str(form),  # a plain string: `weights_only` loading accepts no enum
        "model": dict(model_args),
        "policy": dict(policy) if form != Form.FLOAT and policy is not None else None,
        "precisions": layer_precisions(model),
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "config": config or {},
        "labels": labels or {},
        "lineage": list(lineage or []),
        "metrics": metrics or {},
        "epoch": epoch,
        **extra,
    }


def build_model(
    model_args: dict[str, Any], form: str | Form, policy: dict[str, Any] | None, precisions: dict[str, int]
):
    """An empty model with the structure a checkpoint describes (planes sized to its precisions)."""
    from bsq.models import create_model
    from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model, set_form_

    args = dict(model_args)
    model = create_model(args.pop("arch"), **args)
    if form == Form.FLOAT:
        return model
    if form == Form.FRAC:  # structure from the policy; bit-widths, clips and hard / signed flags come with the state
        from bsq.quant.frac import FracPolicy, frac_quantize_model

        return frac_quantize_model(model, FracPolicy(**(policy or {})))
    if form not in (Form.BITS, Form.LATENT):
        from bsq.methods import form_builder

        builder = form_builder(str(form))
        if builder is None:
            raise BSQError(f"unknown checkpoint form {form!r}")
        return builder(model, policy, dict(precisions))
    scheme = {name: max(int(n), 1) for name, n in precisions.items()}
    quantize_model(model, QuantPolicy(**(policy or {})), scheme=scheme)
    if form == Form.LATENT:
        set_form_(model, "latent")
        for name, layer in bit_layers(model):  # restore exact N, including the 0-bit layers of spec §5.1
            layer.nbits = int(precisions[name])
            if layer.has_bias:
                layer.bias_nbits = int(precisions[f"{name}.bias"])
    return model


def load_model(ckpt: dict[str, Any], overrides: dict[str, Any] | None = None, path: str | Path = "checkpoint"):
    """Rebuild and load the model of a checkpoint. `overrides` replaces model arguments such as `act_bits` (e.g. a
    full-precision pretrain checkpoint loaded into a 4-bit-activation search); PACT clip parameters absent from
    the checkpoint then keep their initial value."""
    args = {**ckpt["model"], **(overrides or {})}
    model = build_model(args, ckpt["form"], ckpt.get("policy"), ckpt.get("precisions", {}))
    state = ckpt["state_dict"]
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    # Changing act_bits adds or drops PACT clips (bits <= 3): absent ones keep their initial value, extra ones go.
    allowed_missing = [k for k in missing if k.endswith(".alpha")] if overrides else []
    allowed_unexpected = [k for k in unexpected if k.endswith(".alpha")] if overrides else []
    state = {k: v for k, v in state.items() if k not in allowed_unexpected}
    unexpected = sorted(set(unexpected) - set(allowed_unexpected))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if set(missing) - set(allowed_missing) or unexpected or wrong:
        raise BSQError(
            f"{path} does not fit the model it describes ({args.get('arch')}): missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, wrong shape {wrong[:4]}. The file was edited or written by an incompatible version."
        )
    model.load_state_dict(state, strict=not allowed_missing)
    return model
