"""Metrics: the spec's counting conventions and the FracBits cost anchors (fracbits.md §1.5)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bsq.metrics import bitops_g, layer_macs, layer_table, model_bitops_g, size_mb, summary
from bsq.models import create_model
from bsq.quant.accounting import QuantizedLayer, TensorCost, linear_macs, scheme_of
from bsq.quant.convert import QuantPolicy, quantize_model


def _fracbits_convention(macs, b):
    """Uniform b bits; first conv 8-bit weights and input, last FC 8-bit weights (fracbits.md §1.5)."""
    names = list(macs)
    w = {n: b for n in names}
    a = {n: b for n in names}
    w[names[0]] = a[names[0]] = 8
    w[names[-1]] = 8
    return w, a


@pytest.mark.parametrize(
    "name, gmacs, expected",
    [("resnet18", 1.814, {3: 22.83, 4: 34.70}), ("mobilenet_v2", 0.301, {3: 3.32, 4: 5.35})],
)
def test_bitops_reproduce_fracbits_targets(name, gmacs, expected):
    macs = layer_macs(create_model(name, 1000, act_bits=None), (3, 224, 224))
    assert sum(macs.values()) / 1e9 == pytest.approx(gmacs, abs=5e-4)
    for b, target in expected.items():
        assert round(bitops_g(macs, *_fracbits_convention(macs, b)), 2) == target


def test_w8a8_resnet18_bitops_match_hawq_v3_116g():
    macs = layer_macs(create_model("resnet18", 1000, act_bits=None), (3, 224, 224))
    eight = {n: 8 for n in macs}
    assert round(bitops_g(macs, eight, eight), 1) == 116.1


def test_mobilenet_v2_weight_only_size_target_2_11_mb():
    model = create_model("mobilenet_v2", 1000, act_bits=None)
    params = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    names = list(params)
    bits = {n: 3 for n in names} | {names[0]: 8, names[-1]: 8}
    assert round(size_mb(params, bits, float_bias_entries=1000), 2) == 2.11


def test_resnet20_summary_at_8_bits_is_exactly_4x():
    s = summary(quantize_model(create_model("resnet20")))
    assert (s["quantized_params"], s["total_bits"], s["compression"], s["avg_bits"]) == (
        268_346,
        2_146_768,
        4.0,
        8.0,
    )
    assert s["size_mb"] == pytest.approx(2_146_768 / 8e6)
    assert s["full_size_mb"] > s["size_mb"]


def test_zero_layers_count_zero_bits_and_shortcuts_are_not_counted():
    model = quantize_model(create_model("resnet20"), QuantPolicy(nbits=4, quantize_shortcuts=True))
    with torch.no_grad():
        model.layer3[2].conv2.pweight.zero_()
        model.layer3[2].conv2.nweight.zero_()
    table = layer_table(model).set_index("layer")
    assert table.loc["layer3.2.conv2", "bits"] == 0 and table.loc["layer3.2.conv2", "nbits"] == 4
    s = summary(model)
    assert s["quantized_params"] == 268_346
    assert s["total_bits"] == 4 * (268_346 - 36_864)


def test_bsq_model_bitops_trace_activation_bits():
    """As run: image 8 bits, stem output (plain ReLU) 32, block ReLU6+Q outputs 4, pooled fc input 32. Under the
    default fracbits convention the two float inputs count at the model's 4-bit activations."""
    model = quantize_model(create_model("resnet20", act_bits=4))
    macs = layer_macs(model, (3, 32, 32))
    w = {n: (32 if "downsample" in n else 8) for n in macs}
    a = {n: 4 for n in macs} | {"conv1": 8, "layer1.0.conv1": 32, "fc": 32}
    assert model_bitops_g(model, (3, 32, 32), "as-run") == pytest.approx(bitops_g(macs, w, a), rel=1e-12)
    a |= {"layer1.0.conv1": 4, "fc": 4}
    assert model_bitops_g(model, (3, 32, 32)) == pytest.approx(bitops_g(macs, w, a), rel=1e-12)


class _TwoBitLinear(nn.Linear):
    """A quantized layer of no method the suite knows: 2-bit weights, its own 4-bit input, a float bias."""

    def tensor_costs(self) -> list[TensorCost]:
        return [TensorCost("", self.weight.numel(), 2, 2, True, a_bits=4)]

    def weight_bits(self) -> float:
        return 2.0

    def input_bits(self) -> float | None:
        return 4.0

    def scheme_entries(self) -> dict[str, float]:
        return {"": 2, ".act": 4}

    def quantized_params(self) -> tuple[str, ...]:
        return ("weight",)

    def macs(self, output: torch.Tensor) -> int:
        return linear_macs(self, output)


def test_metrics_count_any_layer_that_implements_the_protocol():
    """bsq.metrics knows no method's classes: a new quantized layer is counted through QuantizedLayer alone."""
    model = nn.Sequential(nn.Flatten(), _TwoBitLinear(16, 10))
    assert isinstance(model[1], QuantizedLayer)
    got = summary(model)
    assert (got["quantized_params"], got["total_bits"], got["avg_bits"], got["compression"]) == (160, 320, 2.0, 16.0)
    assert got["full_size_mb"] == pytest.approx((320 + 32 * 10) / 8e6)  # the float bias at 32 bits
    assert model_bitops_g(model, (1, 4, 4)) == pytest.approx(1e-9 * 160 * 2 * 4)
    assert scheme_of(model) == {"1": 2, "1.act": 4}
    assert layer_table(model)[["layer", "params", "bits", "a_bits"]].to_dict("records") == [
        {"layer": "1", "params": 160, "bits": 2, "a_bits": 4}
    ]
