"""Registry models: forward shape and gradients for every model in bit form; policy and bad names."""

import pytest
import torch

from bsq.errors import BSQError
from bsq.models import create_model, list_models, model_info
from bsq.quant.act import ActQuant
from bsq.quant.convert import QuantPolicy, bit_layers, export_scheme, quantize_model

SMALL_INPUT = {"cifar": (3, 32, 32), "imagenet": (3, 64, 64)}


def _small_input(name):
    return (3, 80, 80) if name == "inception_v3" else SMALL_INPUT[model_info(name).family]


@pytest.mark.parametrize("name", list_models())
def test_bit_model_forward_backward_every_parameter_gets_a_gradient(name):
    model = quantize_model(create_model(name, num_classes=7))
    model.train()
    out = model(torch.randn(2, *_small_input(name)))
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    assert any(n.endswith("pweight") for n, _ in model.named_parameters())


def test_pact_alpha_gets_gradient_at_low_activation_bits():
    model = quantize_model(create_model("resnet20", act_bits=2))
    model(torch.randn(4, 3, 32, 32) * 50).sum().backward()
    alphas = [p for n, p in model.named_parameters() if n.endswith("relu1.alpha")]
    assert alphas and all(a.grad is not None for a in alphas)


def test_resnet20_head_policy_quantizes_20_layers_not_shortcuts():
    model = quantize_model(create_model("resnet20"))
    names = [n for n, _ in bit_layers(model)]
    assert len(names) == 20 and names[0] == "conv1" and names[-1] == "fc"
    assert not any("downsample" in n for n in names)
    assert isinstance(model.relu, ActQuant) and model.relu.bits is None  # HEAD stem: plain ReLU


def test_paper_era_policy_quantizes_shortcuts_without_counting_them():
    model = quantize_model(create_model("resnet20"), QuantPolicy(quantize_shortcuts=True))
    shortcuts = [layer for n, layer in bit_layers(model) if "downsample" in n]
    assert len(shortcuts) == 2 and not any(s.counted for s in shortcuts)


def test_first_last_policy_is_configurable():
    model = quantize_model(create_model("resnet18", 10), QuantPolicy(quantize_first=False, quantize_last=False))
    scheme = export_scheme(model)
    assert "conv1" not in scheme and "fc" not in scheme and "layer1.0.conv1" in scheme


def test_unknown_model_names_the_available_ones():
    with pytest.raises(BSQError, match="available models: .*resnet20"):
        create_model("resnet21")
