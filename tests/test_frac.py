"""FracBits' quantizers, layers, cost model and hard assignment (fracbits.md §1.3-1.8), against hand-computed values,
the spec's formulas and the official configs' targets."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bsq import checkpoint as C
from bsq.errors import BSQError
from bsq.methods.fracbits.cost import CostModel, hard_assign, penalty, target_from_budget
from bsq.metrics import model_bitops_g, summary
from bsq.models import create_model
from bsq.quant.frac import (
    FracPolicy,
    dorefa_weight,
    frac_layers,
    frac_quantize_model,
    frac_quantize_unit,
    frac_scheme,
    mark_signed_inputs_,
    pact_activation,
    pact_integer,
    round_unit_ste,
)

# The official ResNet-18 / MobileNet-V2 BitOPs configs: weights and activations searched in [1, 8] (fracbits.md §1.9).
SEARCH_BOTH = FracPolicy(w_bits=(1, 8), a_bits=(1, 8), granularity="layer", init_bits=3.5)


def _frac(name: str, policy: FracPolicy, num_classes: int = 1000, size=(3, 224, 224), **kwargs) -> nn.Module:
    model = frac_quantize_model(create_model(name, num_classes, act_bits=None, **kwargs), policy)
    mark_signed_inputs_(model, size)
    return model


# ---- quantizer functions -------------------------------------------------------------------------------------
def test_round_unit_by_hand():
    """Q_k(u) = round((2^k - 1) u) / (2^k - 1); Q_0 is the constant z."""
    u = torch.tensor([0.0, 0.2, 0.4, 0.5, 0.9, 1.0])
    assert torch.allclose(round_unit_ste(u, torch.tensor(1.0), 0.5), torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0]))
    two = torch.tensor([0.0, 1 / 3, 1 / 3, 2 / 3, 1.0, 1.0])  # round(0.6)=1, round(1.2)=1, round(1.5)=2 (half-even)
    assert torch.allclose(round_unit_ste(u, torch.tensor(2.0), 0.5), two)
    assert torch.equal(round_unit_ste(u, torch.tensor(0.0), 0.5), torch.full_like(u, 0.5))


def test_dorefa_levels_are_symmetric_and_zero_bits_prune():
    """1 bit: {-1, +1}; 2 bits: {-1, -1/3, 1/3, 1}, no zero level; 0 bits: exactly 0 (fracbits.md §1.4)."""
    w = torch.linspace(-2, 2, 101)
    one = dorefa_weight(w, torch.tensor(1.0), 0, 8, hard=True)
    assert set(one.unique().tolist()) == {-1.0, 1.0}
    two = dorefa_weight(w, torch.tensor(2.0), 0, 8, hard=True)
    assert torch.allclose(two.unique(), torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))
    assert torch.equal(dorefa_weight(w, torch.tensor(0.0), 0, 8, hard=True), torch.zeros_like(w))
    # the extremes map to +-1: w~ = tanh(w) / max|tanh(w)|
    assert two[0] == -1 and two[-1] == 1


def test_fractional_forward_blends_the_two_neighbours():
    u = torch.rand(50)
    q = frac_quantize_unit(u, torch.tensor(2.25), 1, 8, 0.0)
    expected = 0.75 * round_unit_ste(u, torch.tensor(2.0), 0.0) + 0.25 * round_unit_ste(u, torch.tensor(3.0), 0.0)
    assert torch.allclose(q, expected)
    at_integer = frac_quantize_unit(u, torch.tensor(3.0), 1, 8, 0.0)
    assert torch.allclose(at_integer, round_unit_ste(u, torch.tensor(3.0), 0.0))


@pytest.mark.parametrize("lam, lower", [(2.3, 2), (3.0, 3), (8.0, 7), (9.5, 7), (0.4, 1)])
def test_interpolation_gradient_is_the_difference_of_neighbours(lam, lower):
    """dL/dlam = <dL/dQ, Q_{l+1} - Q_l> with l = min(floor(lam), hi - 1): defined at integers and at the top of the
    range (fracbits.md §1.3, where torch.clamp would give none); zero outside the clamp range."""
    u, g = torch.rand(64), torch.randn(64)
    lam_t = torch.tensor(lam, requires_grad=True)
    (frac_quantize_unit(u, lam_t, 1, 8, 0.0) * g).sum().backward()
    diff = round_unit_ste(u, torch.tensor(lower + 1.0), 0.0) - round_unit_ste(u, torch.tensor(float(lower)), 0.0)
    expected = (g * diff).sum() if 1 <= lam <= 8 else torch.tensor(0.0)
    assert lam_t.grad == pytest.approx(expected.item(), abs=1e-6)
    if 1 <= lam <= 8:
        assert abs(expected.item()) > 0  # never the vanishing gradient of the official ceil at integer lam


def test_weights_get_the_straight_through_gradient():
    u = torch.rand(10, requires_grad=True)
    frac_quantize_unit(u, torch.tensor(2.5), 1, 8, 0.0).sum().backward()
    assert torch.allclose(u.grad, torch.ones(10))


def test_pact_values_and_alpha_gradients():
    """Unsigned clip to [0, a], 2-bit levels a * {0, 1/3, 2/3, 1}; SAT's calibrated d/da = Q(u) - u inside the
    range and 1 where clipped; original PACT d/da = 0 inside and 1 where clipped."""
    x = torch.tensor([-1.0, 0.4, 1.4, 2.0, 5.0])
    for variant, inside in (("sat", True), ("pact", False)):
        alpha = torch.tensor(3.0, requires_grad=True)
        out = pact_activation(x, alpha, torch.tensor(2.0), 2, 2, True, False, variant)
        assert torch.allclose(out, torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0]))  # a * round(3 x / a) / 3
        grads = [torch.autograd.grad(o, alpha, retain_graph=True)[0].item() for o in out]
        u = (x.clamp(0, 3) / 3).tolist()
        q = [round(3 * v) / 3 for v in u]
        expected = [q[i] - u[i] if inside else 0.0 for i in range(4)] + [1.0]
        expected[0] = 0.0  # below zero: nothing reaches alpha
        assert grads == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("variant", ["sat", "pact"])
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_fused_integer_pact_equals_the_composed_ops(variant, bits):
    """The one-node fast path (fixed or hard-assigned input bits) gives the composed quantizer's values and
    gradients for x and alpha."""
    x = (torch.randn(4, 8, 5, 5) * 3).requires_grad_()
    g = torch.randn(4, 8, 5, 5)
    results = []
    for fast in (True, False):
        alpha = torch.tensor(2.5, requires_grad=True)
        xi = x.detach().clone().requires_grad_()
        if fast:
            out = pact_integer(xi, alpha, bits, variant)
        else:
            out = pact_activation(xi, alpha, torch.tensor(float(bits)), bits, bits, True, False, variant)
        (out * g).sum().backward()
        results.append((out.detach(), xi.grad, alpha.grad))
    (o1, gx1, ga1), (o2, gx2, ga2) = results
    assert torch.equal(o1, o2)
    # the composition's dx passes through (x / a) * a, one float rounding off the exact straight-through 1
    assert torch.allclose(gx1, gx2, rtol=1e-6, atol=1e-7)
    assert ga1.item() == pytest.approx(ga2.item(), rel=1e-5, abs=1e-6)


def test_signed_inputs_use_a_two_sided_clip():
    x = torch.tensor([-5.0, -1.0, 0.0, 1.0, 5.0])
    out = pact_activation(x, torch.tensor(2.0), torch.tensor(1.0), 1, 1, True, True, "sat")
    assert torch.allclose(out, torch.tensor([-2.0, -2.0, -2.0, 2.0, 2.0]))  # 1 bit signed: {-a, +a}; 0 -> u = 0.5,
    # which rounds half to even (down), as torch.round


# ---- layers and models ---------------------------------------------------------------------------------------
def test_policy_fixes_first_and_last_layers_and_the_image_input():
    model = _frac("resnet18", SEARCH_BOTH)
    layers = dict(frac_layers(model))
    assert layers["conv1"].w_range == (8, 8) and layers["conv1"].a_range is None  # image not quantized
    assert layers["fc"].w_range == (8, 8) and layers["fc"].a_range == (1, 8)  # FC input searched
    assert layers["layer2.0.downsample.0"].w_range == (1, 8)  # shortcuts searched, as the official code
    assert layers["fc"].rescale and not layers["layer1.0.conv1"].rescale  # SAT: last-layer rescale only
    assert all(layer.wbits.requires_grad == (name not in ("conv1", "fc")) for name, layer in layers.items())


def test_sat_rescale_divides_by_a_detached_std():
    """The authors' SAT fc rescale (fracbits.md §1.5) treats std(w_q) as a constant: the fc weight gradient equals
    a hand-built reference with a detached std, and differs from one that backpropagates through std."""
    torch.manual_seed(0)
    fc = dict(frac_layers(_frac("resnet8", FracPolicy(), 10, (3, 32, 32), width=8)))["fc"]
    assert fc.rescale
    x, g = torch.rand(16, fc.in_features) * 2, torch.randn(16, fc.out_features)
    (fc(x) * g).sum().backward()

    def reference(detach: bool) -> torch.Tensor:
        w = fc.weight.detach().clone().requires_grad_(True)
        wq = dorefa_weight(w, fc.wbits.detach(), *fc.w_range, True)
        std = wq.std().detach() if detach else wq.std()
        out = torch.nn.functional.linear(fc.quantized_input(x).detach(), wq / (math.sqrt(fc.out_features) * std))
        (out * g).sum().backward()
        return w.grad

    assert torch.allclose(fc.weight.grad, reference(detach=True), rtol=1e-5, atol=1e-7)
    assert not torch.allclose(fc.weight.grad, reference(detach=False), rtol=1e-2, atol=1e-4)


def test_relu_inputs_are_unsigned_and_linear_bottlenecks_signed():
    resnet = _frac("resnet20", FracPolicy(), 10, (3, 32, 32))
    assert not any(bool(layer.signed_input) for name, layer in frac_layers(resnet) if name != "conv1")
    mobilenet = _frac("mobilenet_v2", FracPolicy(), 10, (3, 64, 64))
    signed = {name for name, layer in frac_layers(mobilenet) if layer.signed_input}
    assert "features.2.conv.0.0" in signed  # input = block 1's linear-bottleneck output
    assert "features.2.conv.1.0" not in signed  # input = a ReLU6 output
    assert "classifier.1" not in signed  # pooled ReLU6 features


def test_every_searched_bit_width_gets_a_gradient():
    model = _frac("resnet8", SEARCH_BOTH, 10, (3, 32, 32), width=8)
    model(torch.randn(8, 3, 32, 32)).logsumexp(1).sum().backward()
    for name, layer in frac_layers(model):
        if layer.searches_weight:
            assert layer.wbits.grad is not None and layer.wbits.grad.abs() > 0, name
        if layer.searches_act:
            assert layer.abits.grad is not None, name


def test_kernel_wise_zero_bits_prune_output_channels():
    policy = FracPolicy(w_bits=(0, 8), granularity="kernel", init_bits=4.0)
    model = _frac("resnet8", policy, 10, (3, 32, 32), width=8)
    layer = dict(frac_layers(model))["layer1.0.conv1"]
    assert layer.wbits.shape == (8,)
    with torch.no_grad():
        layer.wbits[[1, 5]] = 0.0
    layer.set_hard_()
    w = layer.quantized_weight()
    assert torch.equal(w[[1, 5]], torch.zeros_like(w[[1, 5]])) and (w[0] != 0).all()
    assert layer.weight_bits() == pytest.approx(6 * 4 / 8)  # two kernels free, six at 4 bits


@pytest.mark.parametrize("hard", [False, True])
def test_frac_checkpoint_rebuilds_the_same_function(tmp_path, hard):
    args = {"arch": "resnet8", "num_classes": 10, "act_bits": None, "stem_act_bits": None, "width": 8}
    policy = FracPolicy(granularity="kernel", a_bits=(2, 8))
    model = frac_quantize_model(create_model("resnet8", 10, act_bits=None, width=8), policy)
    mark_signed_inputs_(model, (3, 32, 32))
    with torch.no_grad():
        for _, layer in frac_layers(model):
            layer.wbits.uniform_(1, 8)
            layer.abits.uniform_(2, 8)
    if hard:
        for _, layer in frac_layers(model):
            layer.set_hard_(-0.3)
    path = C.save_checkpoint(
        tmp_path / "m.pt", C.make_checkpoint(model, stage="t", model_args=args, policy=policy.to_dict())
    )
    rebuilt = C.load_model(C.load_checkpoint(path)).eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.eval()(x), rebuilt(x))
    assert frac_scheme(rebuilt) == frac_scheme(model)
    assert all(layer.wbits.requires_grad == layer.searches_weight for _, layer in frac_layers(rebuilt))


# ---- costs ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, expected", [("resnet18", {3: 22.83, 4: 34.70}), ("mobilenet_v2", {3: 3.32, 4: 5.35})])
def test_uniform_bitops_reproduce_the_official_targets(name, expected):
    """Uniform b bits with the fixed layers give the official configs' target_bitops (fracbits.md §1.5)."""
    cost = CostModel(_frac(name, SEARCH_BOTH), (3, 224, 224), "bitops")
    for bits, target in expected.items():
        assert round(cost.uniform_cost(bits), 2) == target
    # the official init_bits: uniform-equivalent bits of the 3-bit target + 0.5 = 3.5
    assert cost.uniform_bits_for(cost.uniform_cost(3)) + 0.5 == pytest.approx(3.5, abs=1e-6)


def test_weight_only_size_of_mobilenet_v2_at_3_bits_is_2_11_mb():
    cost = CostModel(_frac("mobilenet_v2", FracPolicy(a_bits=None)), (3, 224, 224), "size")
    assert round(cost.uniform_cost(3), 2) == 2.11


def test_cost_of_a_hard_model_equals_the_reported_metrics():
    """The regulariser's cost and the evaluation's measurements agree once the bits are integers."""
    model = _frac("resnet8", SEARCH_BOTH, 10, (3, 32, 32), width=8)
    with torch.no_grad():
        for _, layer in frac_layers(model):
            layer.wbits.uniform_(1, 8)
            layer.abits.uniform_(1, 8)
    bitops, size = CostModel(model, (3, 32, 32), "bitops"), CostModel(model, (3, 32, 32), "size")
    for _, layer in frac_layers(model):
        layer.set_hard_()
    assert bitops().item() == pytest.approx(model_bitops_g(model, (3, 32, 32)), rel=1e-6)
    assert size().item() == pytest.approx(summary(model)["size_mb"], rel=1e-6)


def test_penalty_gradient_matches_the_spec_formula():
    """d kappa|C - C_t| / d lambda_w^l = kappa sign(C - C_t) MACs_l lambda_a^l 1e-9 for BitOPs (fracbits.md §1.6)."""
    model = _frac("resnet8", SEARCH_BOTH, 10, (3, 32, 32), width=8)
    cost = CostModel(model, (3, 32, 32), "bitops")
    target = cost().item() * 0.5
    penalty(cost(), target, kappa=2.0, normalize=False).backward()
    entry = next(e for e in cost.entries if e.name == "layer2.0.conv2")
    layer = entry.module
    assert layer.wbits.grad.item() == pytest.approx(2.0 * entry.macs * layer.abits.item() * 1e-9, rel=1e-5)
    model.zero_grad()
    penalty(cost(), target, kappa=2.0, normalize=True).backward()  # normalised: the same divided by C_t
    assert layer.wbits.grad.item() == pytest.approx(2.0 * entry.macs * layer.abits.item() * 1e-9 / target, rel=1e-5)


# ---- hard assignment ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("granularity", ["layer", "kernel"])
def test_bisection_lands_within_one_percent_of_the_target(seed, granularity):
    """Searched bits spread as after a search; the target is the fractional model's own cost, which plain rounding
    misses. The rounded, frozen policy costs within 1 % of it whenever some offset allows it (always, kernel-wise),
    and the model reports exactly that cost."""
    torch.manual_seed(seed)
    model = _frac("resnet20", FracPolicy(w_bits=(1, 8), a_bits=None, granularity=granularity), 10, (3, 32, 32))
    with torch.no_grad():
        for _, layer in frac_layers(model):
            if layer.searches_weight:
                layer.wbits.uniform_(2, 6)
    cost = CostModel(model, (3, 32, 32), "size")
    target = cost().item()
    reachable = [cost(offset=d / 1000).item() for d in range(-1000, 1001)]  # every policy an offset can give
    result = hard_assign(model, cost, target, tolerance=0.01, trials=10)
    assert -1.0 <= result.offset <= 1.0
    if any(abs(c / target - 1) <= 0.01 for c in reachable):
        assert abs(result.relative_error) <= 0.01
    else:  # layer-wise, a large layer's one-bit step can jump over the window: the closest policy under budget
        assert granularity == "layer"
        assert result.cost == pytest.approx(max(c for c in reachable if c <= target), rel=1e-6)
    assert result.cost == pytest.approx(cost().item()) == pytest.approx(summary(model)["size_mb"], rel=1e-6)
    for _, layer in frac_layers(model):
        assert bool(layer.hard) and not layer.wbits.requires_grad
        assert torch.equal(layer.wbits, layer.wbits.round())


def test_bisection_starts_at_zero_and_lowers_the_offset_when_over_budget():
    """The official search: delta = 0 first, then bisection in [-1, 0] while the rounded policy costs too much."""
    model = _frac("resnet20", FracPolicy(a_bits=None, granularity="kernel"), 10, (3, 32, 32))
    with torch.no_grad():
        for _, layer in frac_layers(model):
            if layer.searches_weight:
                layer.wbits.uniform_(3, 7)
    cost = CostModel(model, (3, 32, 32), "size")
    target = cost(offset=0.0).item() * 0.9
    result = hard_assign(model, cost, target)
    assert result.trials[0][0] == 0.0 and result.trials[1][0] == -0.5 and -1.0 <= result.offset < 0
    assert abs(result.relative_error) <= 0.01


def test_unreachable_target_keeps_the_closest_policy_under_budget():
    """One layer-wise bit-width for all layers: the rounded cost jumps from all-3 to all-4 bits and no offset lands
    within 1 %; the closest trial at or under the target wins (a budget is a ceiling before it is a target)."""
    model = _frac("resnet8", FracPolicy(a_bits=None, init_bits=3.6), 10, (3, 32, 32), width=8)
    cost = CostModel(model, (3, 32, 32), "size")
    three, four = cost.uniform_cost(3), cost.uniform_cost(4)
    target = (three + four) / 2
    result = hard_assign(model, cost, target)
    assert len(result.trials) == 10 and result.cost == pytest.approx(three) and result.cost < target


def test_a_stalled_search_is_still_brought_to_the_budget():
    """All bits stuck at 6 with a 2-bit target: the official [-1, 0] cannot reach it, the widened bracket does."""
    model = _frac("resnet20", FracPolicy(a_bits=None, granularity="kernel", init_bits=6.0), 10, (3, 32, 32))
    with torch.no_grad():
        for _, layer in frac_layers(model):
            if layer.searches_weight:
                layer.wbits.add_(torch.rand_like(layer.wbits) - 0.5)
    cost = CostModel(model, (3, 32, 32), "size")
    target = cost.uniform_cost(2.0)
    result = hard_assign(model, cost, target)
    assert abs(result.relative_error) <= 0.01 and result.offset < -3
    assert [d for d, _ in result.trials[:2]] == [0.0, -0.5]  # the official search ran first


def test_compression_budget_gives_the_same_average_bits():
    """match: compression turns a BSQ run's compression into this model's size target: the same average bits per
    counted weight, hence the same compression column in the tables (fixed 8-bit layers included)."""
    model = _frac("resnet20", FracPolicy(a_bits=None, granularity="kernel"), 10, (3, 32, 32))
    cost = CostModel(model, (3, 32, 32), "size")
    target = target_from_budget({"compression": 8.0}, "compression", cost)  # 4 bits per counted weight
    equivalent = cost.uniform_bits_for(target)
    assert 3.8 < equivalent < 4.0  # the fixed 8-bit first and last layers leave a bit less for the others
    with torch.no_grad():
        for _, layer in frac_layers(model):
            if layer.searches_weight:
                layer.wbits.uniform_(equivalent - 1, equivalent + 1)
    hard_assign(model, cost, target)
    assert summary(model)["compression"] == pytest.approx(8.0, rel=0.01)
    with pytest.raises(BSQError, match="fracbits.cost: bitops"):
        target_from_budget({"bitops_g": 1.0}, "bitops", cost)
    with pytest.raises(BSQError, match="outside what the bit ranges can reach"):
        cost.uniform_bits_for(cost.uniform_cost(8) * 2)


def test_cost_model_needs_frac_layers():
    with pytest.raises(BSQError, match="no FracBits layers"):
        CostModel(create_model("resnet8", 10, act_bits=None), (3, 32, 32), "size")
    assert math.isfinite(penalty(torch.tensor(2.0), 1.0, 1.0, True).item())
