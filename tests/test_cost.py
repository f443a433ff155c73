"""The cost accountant: named BitOPs conventions (bsq.cost) over one trace of a model of any method (bsq.metrics),
checked by hand counts and against the published anchors (fracbits.md §1.5, HAWQ-V3 model_zoo.md)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from bsq.cost import (
    DEFAULT_POLICY,
    POLICIES,
    BitopsPolicy,
    LayerTrace,
    bitops_g,
    bitops_keys,
    counted_bits,
    footnote,
    policy,
)
from bsq.methods.fracbits.cost import CostModel, target_from_budget
from bsq.metrics import layer_table, model_bitops_g, trace_layers
from bsq.models import create_model
from bsq.quant.convert import QuantPolicy, quantize_model
from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model, mark_signed_inputs_
from bsq.stages.measure import cost_metrics


def _uniform(name: str, bits: int, num_classes: int = 1000, size=(3, 224, 224), fixed_bits: int = 8) -> nn.Module:
    """Uniform QAT (FracBits layers at integer bits): weights and inputs at `bits`, the first conv and last linear
    with `fixed_bits` weights, the first conv's (image) input unquantized (fracbits.md §1.5 "Fixed layers")."""
    model = create_model(name, num_classes, act_bits=None)
    rule = FracPolicy(w_bits=(bits, bits), a_bits=(bits, bits), init_bits=bits, hard=True, fixed_bits=fixed_bits)
    frac_quantize_model(model, rule)
    mark_signed_inputs_(model, size[:1] + (32, 32))  # signedness does not depend on the resolution
    return model


# ---- hand counts on traces (torch-free) -------------------------------------------------------------------------
# image -> conv1 (4-bit weights) -> float stem output -> conv2 (4 x ActQuant 4) -> shortcut (float weights, input
# from the ActQuant) -> pooled float features -> fc (4-bit weights)
TRACES = [
    LayerTrace("conv1", 100, 4, None, True, image_input=True),
    LayerTrace("conv2", 200, 4, None, True),
    LayerTrace("conv3", 300, 4, 4, True, act_quant=True),
    LayerTrace("short", 50, 32, 4, False, act_quant=True),
    LayerTrace("fc", 10, 4, None, True, last=True),
]


def test_hand_counts_of_every_named_policy():
    as_run = 100 * 4 * 8 + 200 * 4 * 32 + 300 * 4 * 4 + 50 * 32 * 4 + 10 * 4 * 32
    fracbits = 100 * 4 * 8 + 200 * 4 * 4 + 300 * 4 * 4 + 50 * 32 * 4 + 10 * 4 * 4  # float inputs at the act bits
    hawq = 100 * 4 * 8 + 200 * 4 * 4 + 300 * 4 * 4 + 50 * 32 * 4 + 10 * 4 * 8  # ... the classifier input at 8
    assert bitops_g(TRACES, "as-run") == pytest.approx(1e-9 * as_run)
    assert bitops_g(TRACES, "fracbits") == pytest.approx(1e-9 * fracbits)
    assert bitops_g(TRACES, "hawq-v3") == pytest.approx(1e-9 * hawq)
    assert counted_bits(TRACES, "as-run")["conv2"] == (4.0, 32.0)  # BSQ's plain-ReLU stem output
    assert counted_bits(TRACES, "fracbits")["conv2"] == (4.0, 4.0)


def test_policy_options_float_layers_and_weight_only():
    skip = BitopsPolicy("x", "test", "test", float_layers="skip")
    assert counted_bits(TRACES, skip)["short"] is None
    assert bitops_g(TRACES, skip) == pytest.approx(bitops_g(TRACES, "as-run") - 1e-9 * 50 * 32 * 4)
    weights = BitopsPolicy("w", "test", "test", product="w")
    assert bitops_g(TRACES, weights) == pytest.approx(1e-9 * (100 + 200 + 300 + 10) * 4 + 1e-9 * 50 * 32)
    with pytest.raises(ValueError, match="float_inputs"):
        BitopsPolicy("bad", "test", "test", float_inputs="zero")
    with pytest.raises(ValueError, match="unknown BitOPs policy"):
        policy("nope")


def test_a_model_without_activation_quantizers_keeps_float_inputs_at_32():
    """Imputation only copies the model's own activation bits: a weight-only model's inputs stay 32-bit."""
    traces = [LayerTrace("a", 10, 4, None, True, image_input=True), LayerTrace("b", 10, 4, None, True, last=True)]
    assert bitops_g(traces, "fracbits") == pytest.approx(1e-9 * (10 * 4 * 8 + 10 * 4 * 32))


def test_records_and_footnotes_name_the_policy():
    keys = bitops_keys(TRACES)
    assert keys["bitops_policy"] == DEFAULT_POLICY == "fracbits"
    assert keys["bitops_g"] == keys["bitops_g@fracbits"]
    assert set(keys) == {"bitops_g", "bitops_policy"} | {f"bitops_g@{name}" for name in POLICIES}
    note = footnote(metrics={"bitops_policy": "hawq-v3"})
    assert note.startswith("BitOPs (hawq-v3 convention)") and "Zhen-Dong/HAWQ" in note
    assert all(p.source and p.certainty for p in POLICIES.values())


# ---- the anchors, through the accountant on real models ---------------------------------------------------------
def test_fracbits_anchors_on_uniform_resnet18():
    """ResNet-18 uniform W3A3 / W4A4 with 8-bit first conv and FC weights: the official FracBits targets 22.83 /
    34.70 G (and HAWQ-V3's W4A4 34 G, ours 34.70), every convention alike: these models leave nothing to impute."""
    model = create_model("resnet18", 1000, act_bits=None)
    frac_quantize_model(model, FracPolicy(w_bits=(1, 8), a_bits=(1, 8), init_bits=3, hard=True))
    mark_signed_inputs_(model, (3, 32, 32))
    got = {}
    for bits in (3, 4):
        with torch.no_grad():
            for _, layer in frac_layers(model):  # the fixed ranges (first conv and FC weights at 8) keep their bits
                layer.wbits.fill_(bits)
                layer.abits.fill_(bits)
        got[bits] = bitops_keys(trace_layers(model, (3, 224, 224)))
        assert got[bits]["bitops_g@as-run"] == got[bits]["bitops_g@fracbits"] == got[bits]["bitops_g@hawq-v3"]
    assert (round(got[3]["bitops_g"], 2), round(got[4]["bitops_g"], 2)) == (22.83, 34.70)


def test_hawq_v3_anchors_on_resnet18():
    """HAWQ-V3's zoo: FP 1858 G (MACs x 32 x 32, the image at 32 bits; ours 1857.2) and W8A8 116 G (ours 116.1)."""
    model = create_model("resnet18", 1000, act_bits=None)
    assert model_bitops_g(model, (3, 224, 224), "hawq-v3") == pytest.approx(1858, abs=1)
    assert model_bitops_g(model, (3, 224, 224), "fracbits") < 1858 - 80  # FracBits: the image at 8 bits
    frac_quantize_model(model, FracPolicy(w_bits=(8, 8), a_bits=(8, 8), init_bits=8, hard=True))
    mark_signed_inputs_(model, (3, 32, 32))
    assert round(model_bitops_g(model, (3, 224, 224), "hawq-v3"), 1) == 116.1


# ---- the BSQ stem case ------------------------------------------------------------------------------------------
def _bsq(bits: int = 4) -> nn.Module:
    """BSQ's default ResNet-20: 4-bit ReLU6 + Q activations in the blocks, a plain-ReLU (float) stem."""
    return quantize_model(create_model("resnet20", act_bits=4), QuantPolicy(nbits=bits, quantize_shortcuts=True))


def test_bsq_and_uniform_at_the_same_bits_cost_the_same_under_one_policy():
    """As run, BSQ's float stem output and pooled features cost 32 bits; under fracbits they count at the model's
    4-bit activations, so BSQ W4A4 and uniform W4A4 (4-bit first and last layers too) give the same BitOPs."""
    shape = (3, 32, 32)
    bsq = bitops_keys(trace_layers(_bsq(), shape))
    uniform = bitops_keys(trace_layers(_uniform("resnet20", 4, 10, shape, fixed_bits=4), shape))
    assert bsq["bitops_g@fracbits"] == pytest.approx(uniform["bitops_g@fracbits"], rel=1e-12)
    assert bsq["bitops_g@as-run"] > 1.2 * uniform["bitops_g@as-run"]
    traces = trace_layers(_bsq(), shape)
    stem = next(t for t in traces if t.name == "layer1.0.conv1")
    assert stem.a_bits is None and counted_bits(traces, "fracbits")["layer1.0.conv1"] == (4.0, 4.0)
    # hand count: every layer 4-bit weights x 4-bit inputs except the image (8)
    hand = sum(t.macs * 4 * (8 if t.name == "conv1" else 4) for t in traces)
    assert bsq["bitops_g@fracbits"] == pytest.approx(1e-9 * hand)


def test_layer_table_fills_a_bits_from_the_trace_for_every_method():
    bsq = layer_table(_bsq()).set_index("layer")["a_bits"]
    assert (bsq["conv1"], bsq["layer1.0.conv1"], bsq["layer1.0.conv2"], bsq["fc"]) == (8, 32, 4, 32)
    assert pd.isna(bsq["fc.bias"])  # a bias has no input of its own
    uniform = layer_table(_uniform("resnet20", 3, 10, (3, 32, 32))).set_index("layer")["a_bits"]
    assert (uniform["conv1"], uniform["layer1.0.conv1"], uniform["fc"]) == (8, 3, 3)


def test_cost_metrics_record_every_convention():
    info = SimpleNamespace(in_channels=3, image_size=32)
    got = cost_metrics(_bsq(), info)
    assert got["bitops_policy"] == "fracbits" and got["bitops_g"] == got["bitops_g@fracbits"]
    assert got["bitops_g@as-run"] > got["bitops_g@fracbits"]
    fp = cost_metrics(create_model("resnet20", act_bits=None), info)
    assert fp["bitops_g@hawq-v3"] > fp["bitops_g@fracbits"]  # HAWQ-V3's FP row counts the image at 32 bits


def test_fracbits_cost_model_takes_its_conventions_from_the_policy():
    model = _uniform("resnet20", 4, 10, (3, 32, 32))
    assert float(CostModel(model, (3, 32, 32), "bitops")()) == pytest.approx(
        model_bitops_g(model, (3, 32, 32)), rel=1e-6
    )
    image32 = BitopsPolicy("image32", "test", "test", image_bits=32)
    first = next(t for t in trace_layers(model, (3, 32, 32)) if t.image_input)
    extra = 1e-9 * first.macs * first.w_bits * (32 - 8)
    assert float(CostModel(model, (3, 32, 32), "bitops", image32)()) == pytest.approx(
        model_bitops_g(model, (3, 32, 32)) + extra, rel=1e-6
    )


def test_published_rows_name_a_known_convention():
    """Every published BitOPs number says which convention it was counted under, a policy of bsq.cost."""
    root = Path(__file__).resolve().parents[1]
    schema = yaml.safe_load((root / "workflow" / "schemas" / "published_baselines.schema.yaml").read_text())
    assert set(schema["properties"]["bitops_policy"]["enum"]) == set(POLICIES)
    rows = pd.read_csv(root / "config" / "published_baselines.csv")
    with_bitops = rows[rows["bitops_g"].notna()]
    assert with_bitops["bitops_policy"].isin(list(POLICIES)).all()
    assert set(with_bitops["bitops_policy"]) == {"fracbits", "hawq-v3"}


def test_a_bitops_budget_is_read_under_the_cost_models_convention():
    """FracBits matched to a BSQ run's BitOPs reads them counted the way its own cost model counts."""
    model = _uniform("resnet20", 4, 10, (3, 32, 32))
    budget = {"bitops_g": 9.0, "bitops_g@fracbits": 2.0, "bitops_g@as-run": 3.0}
    assert target_from_budget(budget, "bitops", CostModel(model, (3, 32, 32), "bitops")) == 2.0
    assert target_from_budget(budget, "bitops", CostModel(model, (3, 32, 32), "bitops", "as-run")) == 3.0
    assert target_from_budget({"bitops_g": 9.0}, "bitops", CostModel(model, (3, 32, 32), "bitops")) == 9.0
