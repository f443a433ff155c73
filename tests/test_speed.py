"""Speed switches (`speed.*`): they change how fast training runs, never a quantized value. Checked on CPU, where
bf16 autocast and channels_last exist too (the CUDA path is the same code)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from bsq.config import SpeedConfig
from bsq.engine import Speed, train_one_epoch
from bsq.errors import BSQError
from bsq.methods.bsq import search
from bsq.models import create_model
from bsq.quant.convert import bit_layers, clamp_bits_, quantize_model
from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model, mark_signed_inputs_
from bsq.stages import default_outputs, pretrain

BF16 = Speed(amp=torch.bfloat16)


def _bsq_model():
    torch.manual_seed(0)
    return quantize_model(create_model("resnet8", 10, act_bits=4, width=8))


def _frac_model():
    torch.manual_seed(0)
    model = frac_quantize_model(create_model("resnet8", 10, act_bits=None, width=8), FracPolicy(init_bits=3.4))
    mark_signed_inputs_(model, (3, 32, 32))
    return model


def _record(model, attribute):
    """Wrap every quantized layer's `attribute` method so each call's result is kept."""
    seen = []
    layers = [m for _, m in bit_layers(model)] + [m for _, m in frac_layers(model)]
    for layer in layers:
        original = getattr(layer, attribute)

        def wrapper(*args, _original=original, **kwargs):
            out = _original(*args, **kwargs)
            seen.append(out.detach().clone())
            return out

        setattr(layer, attribute, wrapper)
    return seen


@pytest.mark.parametrize("build, attribute", [(_bsq_model, "quantized"), (_frac_model, "quantized_weight")])
def test_bf16_autocast_keeps_every_quantized_weight_bit_exact(build, attribute):
    model = build().eval()
    x = torch.randn(4, 3, 32, 32)
    fp32 = _record(model, attribute)
    model(x)
    with BF16.autocast(x.device):
        out = model(x)
    half = fp32[len(fp32) // 2 :]
    assert out.dtype == torch.bfloat16  # the convolutions did run in bfloat16
    assert len(half) == len(fp32[: len(half)]) > 0
    for a, b in zip(fp32[: len(half)], half, strict=True):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)


def test_activations_are_quantized_in_float32_on_their_grid_under_autocast():
    model = _bsq_model().eval()
    outputs = []
    for module in model.modules():
        if type(module).__name__ == "ActQuant" and module.quantizes:
            module.register_forward_hook(lambda m, i, o: outputs.append(o))
    with BF16.autocast(torch.device("cpu")):
        model(torch.randn(4, 3, 32, 32))
    assert outputs
    for out in outputs:
        assert out.dtype == torch.float32
        levels = out * 15 / out.abs().amax()  # 4 bits: S * k / 15
        assert torch.allclose(levels, levels.round(), atol=1e-4)


def test_frac_inputs_are_quantized_in_float32_under_autocast():
    model = _frac_model().eval()
    seen = []
    layer = dict(frac_layers(model))["layer2.0.conv2"]
    layer.register_forward_pre_hook(lambda m, i: seen.append(m.quantized_input(i[0])))
    with BF16.autocast(torch.device("cpu")):
        model(torch.randn(4, 3, 32, 32))
    q = seen[0]
    alpha = layer.act_alpha.abs()
    assert q.dtype == torch.float32 and torch.allclose(q / alpha * 15, (q / alpha * 15).round(), atol=1e-4)


def _train_steps(model, speed: Speed, steps: int = 3) -> torch.nn.Module:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model = speed.prepare(model)
    gen = torch.Generator().manual_seed(1)
    batches = [
        (torch.randn(16, 3, 32, 32, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(steps)
    ]

    class Loader(list):
        pass

    train_one_epoch(
        model, Loader(batches), opt, torch.device("cpu"), after_step=lambda: clamp_bits_(model), speed=speed
    )
    return model


def test_channels_last_trains_to_the_same_quantized_weights():
    plain = _train_steps(_bsq_model(), Speed())
    nhwc = _train_steps(_bsq_model(), Speed(channels_last=True))
    for (name, a), (_, b) in zip(bit_layers(plain), bit_layers(nhwc), strict=True):
        assert torch.equal(a.integer_levels(), b.integer_levels()), name
        assert torch.allclose(a.pweight, b.pweight, atol=1e-3), name  # relaxed planes: summation order only


def test_speed_defaults_are_on_where_safe():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert Speed.resolve(SpeedConfig(), cpu) == Speed(channels_last=False, amp=None, compile=False)
    assert Speed.resolve(SpeedConfig(), cuda) == Speed(channels_last=True, amp=None, compile=False)  # amp: opt in
    assert Speed.resolve(SpeedConfig(channels_last=False, amp="bf16"), cuda).amp == torch.bfloat16
    with pytest.raises(BSQError, match="speed.amp must be null or bf16"):
        SpeedConfig(amp="fp16")


def test_a_search_runs_with_every_switch_but_compile(tmp_path):
    cfg = {
        "device": "cpu",
        "data": {"name": "digits", "batch_size": 64, "train_subset": 256},
        "model": {"arch": "resnet8", "width": 4, "act_bits": 4},
        "optim": {"epochs": 1},
        "tracking": {"enabled": False},
    }
    base = default_outputs("pretrain", tmp_path / "p")
    pretrain.run(cfg, {}, base)
    fast = {**cfg, "speed": {"channels_last": True, "amp": "bf16"}, "bsq": {"alpha": "0.1"}}
    out = default_outputs("search", tmp_path / "s")
    metrics = search.run(fast, {"checkpoint": base["checkpoint"]}, out)
    assert 0 < metrics["final_top1"] <= 100 and metrics["final_penalty"] > 0


@pytest.mark.slow
def test_compiled_forward_matches_eager():
    model = _bsq_model().eval()
    x = torch.randn(2, 3, 32, 32)
    eager = model(x)
    compiled = torch.compile(model)(x)
    assert torch.allclose(eager, compiled, atol=1e-4)
    assert F.cross_entropy(compiled, torch.tensor([1, 2])).isfinite()
