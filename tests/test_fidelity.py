"""The fidelity switches of issue 16 change behaviour exactly as the authors' code does (bsq.md §3, §5; fracbits.md
§1.3): each test runs both values of one switch on a hand-built case whose expected outcome is computed by hand or
is an invariant, never by the code under test."""

from __future__ import annotations

import pytest
import torch

from bsq.models import create_model
from bsq.quant.convert import QuantPolicy, clamp_finetune_, quantize_model, set_form_


def _latent_resnet8(fill: float) -> torch.nn.Module:
    """A ResNet-8 in finetune (latent) form with every parameter set to `fill`."""
    model = quantize_model(create_model("resnet8", act_bits=4), QuantPolicy(nbits=2))
    set_form_(model, "latent")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(fill)
    return model


@pytest.mark.parametrize("fill", [3.0, -3.0])
def test_finetune_clamp_latent_touches_only_latent_weights_official_every_weight_but_bn(fill):
    """Spec §5.2: the authors clamp every parameter named `weight` without `bn` to [-1, 1], so the float shortcut
    conv and the shortcut BN's gamma (`downsample.1.weight`, no `bn` in its name) too; ours only the latent V."""
    latent, official = _latent_resnet8(fill), _latent_resnet8(fill)
    clamp_finetune_(latent, "latent")
    clamp_finetune_(official, "official")
    bound = 1.0 if fill > 0 else -1.0
    for model in (latent, official):
        assert torch.all(model.layer1[0].conv1.weight == bound) and torch.all(model.fc.weight == bound)
        assert model.layer1[0].conv1.scale.item() == fill and torch.all(model.fc.bias == fill)  # scale, latent bias
        assert torch.all(model.bn1.weight == fill) and torch.all(model.layer1[0].bn2.weight == fill)  # `bn` names
        assert torch.all(model.layer2[0].downsample[1].bias == fill)  # no `weight` in the name
    for model, expected in ((latent, fill), (official, bound)):
        shortcut_conv, shortcut_gamma = model.layer2[0].downsample[0].weight, model.layer2[0].downsample[1].weight
        assert torch.all(shortcut_conv == expected) and torch.all(shortcut_gamma == expected)
