"""Import checkpoints written by the authors' code (yanghr/BSQ), spec §7 and P20.

Float form (`model_best.pth.tar` of the FP ResNet-20): a dict with `state_dict` whose keys carry `module.`.
Bit form (`checkpoint.pth.tar` of BSQ / `best_bin`): the same plus `Nbit_dict = {layer: [N_w, N_b or 0]}`,
which must size the planes *before* `load_state_dict`, and 0-dim `scale` tensors.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from bsq.errors import BSQError
from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model

__all__ = ["read_official_checkpoint", "load_official_state", "official_model"]


def official_model(
    model_args: dict[str, Any], path: str | Path, bit_policy: QuantPolicy | None = None, *, who: str = "this command"
) -> nn.Module:
    """The model `model_args` describes (`bsq.checkpoint.build_model` arguments), holding the weights of the
    authors' checkpoint at `path`. A bit-form file (`Nbit_dict`) is built in bit form with `bit_policy` first (then
    sized to its Nbit_dict); without a policy it is refused: `who` takes float checkpoints only."""
    from bsq.checkpoint import Form, build_model

    ckpt = read_official_checkpoint(path)
    bit_form = bool(ckpt.get("Nbit_dict"))
    if bit_form and bit_policy is None:
        raise BSQError(f"{path} is a bit-form checkpoint; {who} takes float checkpoints only")
    model = build_model(model_args, Form.FLOAT, None, {})
    if bit_form:  # the authors' bit form: build bit layers first, then size them to Nbit_dict
        quantize_model(model, bit_policy)
    return load_official_state(model, ckpt)


def read_official_checkpoint(path: str | Path) -> dict:
    """Load the checkpoint dict on CPU with `weights_only=True`; errors name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise BSQError(f"checkpoint not found: {path}. Pass the path of an official BSQ .pth.tar file.")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign files
        raise BSQError(f"cannot read checkpoint {path}: {exc}. Is it a complete PyTorch checkpoint?") from exc
    if isinstance(ckpt, dict) and "state_dict" not in ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        ckpt = {"state_dict": ckpt}
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise BSQError(f"{path} holds no 'state_dict'; it is not a checkpoint of the official BSQ code")
    return ckpt


def strip_prefix(state_dict: dict[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state_dict.items()}


def load_official_state(model: nn.Module, ckpt: dict) -> nn.Module:
    """Load an official float or bit-form checkpoint into `model` (float form, or bit form already built).

    For a bit-form checkpoint the model's bit layers are resized to `Nbit_dict` first; scales of shape () or
    (1,) are both accepted. A checkpoint of another architecture fails with the mismatching keys listed.
    """
    state = strip_prefix(ckpt["state_dict"])
    nbit_dict = {k.removeprefix("module."): v for k, v in (ckpt.get("Nbit_dict") or {}).items()}
    layers = dict(bit_layers(model))
    for name, (n_w, n_b) in nbit_dict.items():
        if name not in layers:
            raise BSQError(
                f"checkpoint Nbit_dict names layer {name!r}, which is not a bit layer of this model. Build the "
                "model in bit form (quantize_model) with the same architecture before loading."
            )
        layers[name].set_precision_(int(n_w), "weight")
        if layers[name].has_bias and n_b:
            layers[name].set_precision_(int(n_b), "bias")
    for key, value in state.items():
        if key.endswith(("scale", "biasscale")) and value.dim() == 1 and value.numel() == 1:
            state[key] = value.reshape(())
    expected = model.state_dict()
    if not any(k.startswith("AuxLogits.") for k in expected):
        # torchvision's Inception-V3 weights carry the training-only auxiliary head; our model has none.
        state = {k: v for k, v in state.items() if not k.startswith("AuxLogits.")}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong_shape = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    if missing or unexpected or wrong_shape:
        raise BSQError(
            "checkpoint does not fit this model (another architecture or depth?): "
            f"missing {missing[:4]}, unexpected {unexpected[:4]}, wrong shape {wrong_shape[:4]} "
            f"({len(missing)}/{len(unexpected)}/{len(wrong_shape)} keys). Pick the model the checkpoint was "
            "trained with, e.g. resnet20 for the official CIFAR-10 checkpoint."
        )
    model.load_state_dict(state, strict=True)
    return model
