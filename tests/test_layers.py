"""Bit layers: exact agreement between forms, STE gradients of spec §1.5, projections and conversions."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bsq.errors import BSQError
from bsq.quant import bits as B
from bsq.quant.convert import (
    QuantPolicy,
    export_integer,
    export_scheme,
    quantize_model,
    requantize_model,
    set_form_,
    to_float_model,
)
from bsq.quant.layers import BitConv2d, BitLinear


def _toy():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 4, 3, stride=2, groups=2),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


@pytest.mark.parametrize("nbits", [1, 3, 8])
def test_bitplane_forward_equals_integer_export_forward_bit_for_bit(nbits):
    """The exported integers + scales rebuild a float model whose outputs equal the bit model's (atol = 0)."""
    model = quantize_model(_toy(), QuantPolicy(nbits=nbits))
    x = torch.randn(4, 3, 8, 8)
    ints = export_integer(model)
    rebuilt = _toy()
    for name, layer in [("0", rebuilt[0]), ("2", rebuilt[2]), ("4", rebuilt[4])]:
        with torch.no_grad():
            layer.weight.copy_(ints[name].dequantize())
            layer.bias.copy_(ints[f"{name}.bias"].dequantize())
    assert torch.equal(model(x), rebuilt(x))
    assert all(t.values.dtype == torch.long and t.values.abs().max() <= 2**nbits - 1 for t in ints.values())


def test_to_float_model_is_exact():
    model = quantize_model(_toy(), QuantPolicy(nbits=4))
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert torch.equal(to_float_model(model)(x), expected)


def test_from_float_matches_hand_computed_planes():
    lin = nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -1.0, 0.0, 0.2]]))
    layer = BitLinear.from_float(lin, nbits=3)
    assert layer.pweight.shape == (1, 4, 3) and layer.nweight.tolist()[0][1] == [1, 1, 1]
    assert torch.allclose(layer.quantized("weight"), torch.tensor([[4 / 7, -1.0, 0.0, 1 / 7]]))


def test_ste_gradients_match_spec_formulas():
    """dL/dp_b = s e_b G, dL/dn_b = -s e_b G, dL/ds = sum G q (spec §1.5)."""
    lin = nn.Linear(6, 3, bias=False)
    layer = BitLinear.from_float(lin, nbits=4)
    x = torch.randn(5, 6)
    g_out = torch.randn(5, 3)
    w = layer.quantized("weight")
    w.retain_grad()
    F.linear(x, w).backward(g_out)
    G = w.grad
    e = B.place_values(4)
    s = layer.scale.detach()
    assert torch.allclose(layer.pweight.grad, s * G.unsqueeze(-1) * e)
    assert torch.allclose(layer.nweight.grad, -s * G.unsqueeze(-1) * e)
    q = w.detach() / s
    assert torch.allclose(layer.scale.grad, (G * q).sum())


def test_forward_clips_overflowing_planes():
    """Planes summing above 1 are clipped to s in the forward pass (spec §1.4)."""
    layer = BitLinear(1, 1, bias=False, nbits=2)
    with torch.no_grad():
        layer.pweight.fill_(2.0)
        layer.scale.fill_(0.5)
    assert layer.quantized("weight").item() == 0.5


def test_clamp_projects_planes_to_0_2_and_latent_to_unit_interval():
    layer = BitConv2d(2, 2, 3, nbits=3)
    with torch.no_grad():
        layer.pweight.uniform_(-3, 3)
        layer.nweight.uniform_(-3, 3)
    layer.clamp_()
    assert layer.pweight.min() >= 0 and layer.pweight.max() <= 2 and layer.nweight.min() >= 0
    layer.to_latent_()
    with torch.no_grad():
        layer.weight.uniform_(-3, 3)
    layer.clamp_()
    assert layer.weight.abs().max() <= 1


def test_latent_round_trip_keeps_outputs():
    """bits -> latent (finetune form) -> bits leaves the function and the planes unchanged (spec §5)."""
    model = quantize_model(_toy(), QuantPolicy(nbits=5))
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    planes_before = model[0].pweight.clone()
    set_form_(model, "latent")
    assert "0.weight" in dict(model.named_parameters())
    assert torch.equal(model(x), before)
    set_form_(model, "bits")
    assert torch.equal(model(x), before) and torch.equal(model[0].pweight, planes_before)


def test_all_zero_layer_is_zero_bits_and_latent_n0():
    layer = BitLinear.from_float(nn.Linear(3, 2, bias=False), nbits=4)
    with torch.no_grad():
        layer.pweight.zero_()
        layer.nweight.zero_()
    layer.requantize_()
    assert layer.nbits == 1 and layer.effective_bits() == 0
    layer.to_latent_()
    assert layer.nbits == 0 and torch.equal(layer(torch.randn(2, 3)), torch.zeros(2, 2))


def test_requantize_model_on_binary_planes_is_a_no_op():
    model = quantize_model(_toy(), QuantPolicy(nbits=8))
    x = torch.randn(2, 3, 8, 8)
    before = model(x)
    scheme = requantize_model(model)
    assert torch.allclose(model(x), before, rtol=0, atol=1e-6)
    assert set(scheme) == {"0", "0.bias", "2", "2.bias", "4", "4.bias"}


def test_quantize_from_scheme_sets_per_layer_bits():
    scheme = {"0": 2, "0.bias": 8, "2": 0, "2.bias": 3, "4": 5, "4.bias": 5}
    model = quantize_model(_toy(), scheme=scheme)
    assert export_scheme(model) == scheme


@pytest.mark.parametrize(
    "scheme, message",
    [
        ({"0": 2, "0.bias": 8, "2": 3, "2.bias": 3, "4": 5, "4.bias": 5, "layer9": 4}, "unknown layers"),
        ({"0": 2}, "missing layers"),
        (
            {"0": 17, "0.bias": 8, "2": 3, "2.bias": 3, "4": 5, "4.bias": 5},
            "bits must be an integer in 0..16",
        ),
        ({"0": -1, "0.bias": 8, "2": 3, "2.bias": 3, "4": 5, "4.bias": 5}, "bits must be an integer"),
    ],
)
def test_bad_scheme_is_rejected_with_the_fix(scheme, message):
    with pytest.raises(BSQError, match=message):
        quantize_model(_toy(), scheme=scheme)


def test_policy_rejects_bits_out_of_range():
    with pytest.raises(BSQError, match="0..16"):
        QuantPolicy(nbits=20)
