"""The authors' FP ResNet-20 and the reconstructed CIFAR-10: the spec's measured anchors (§1.3, §2.2, §6)."""

import pytest
import torch

from bsq.data import normalize_cifar, read_cifar10
from bsq.errors import BSQError
from bsq.metrics import layer_table, summary
from bsq.models import create_model
from bsq.official import load_official_state, read_official_checkpoint
from bsq.quant.convert import bit_layers, quantize_model
from bsq.regularizers import bit_penalty, group_norms

pytestmark = pytest.mark.shared_data


@pytest.fixture(scope="module")
def official(request):
    from tests.conftest import SHARED_DATA

    path = SHARED_DATA / "bsq_official_resnet20" / "model_best.pth.tar"
    if not path.is_file():
        pytest.skip(f"official checkpoint check skipped: {path} is absent (needs ../shared/data)")
    return read_official_checkpoint(path)


@pytest.fixture(scope="module")
def bit_model(official):
    return quantize_model(load_official_state(create_model("resnet20"), official))


def test_fp_accuracy_on_exact_test_images_is_92_04(official, shared_data):
    """Float weights, unquantized activations, first 1,017 (bit-exact) test images: 936/1017 = 92.04 %."""
    images, labels = read_cifar10(shared_data / "cifar10_recon", train=False)
    x, y = normalize_cifar(images[:1017]), labels[:1017]
    model = load_official_state(create_model("resnet20", act_bits=None), official).eval()
    with torch.no_grad():
        correct = sum((model(x[i : i + 100]).argmax(1) == y[i : i + 100]).sum().item() for i in range(0, 1017, 100))
    assert correct == 936 and round(100 * correct / 1017, 2) == 92.04


def test_8bit_counts_and_compression(bit_model):
    s = summary(bit_model)
    assert s["quantized_params"] == 268_346 and s["total_bits"] == 2_146_768 and s["compression"] == 4.0


def test_initial_scales_and_round_trip_error(bit_model, official):
    assert bit_model.conv1.scale.item() == pytest.approx(1.4695, abs=1e-4)
    assert bit_model.fc.biasscale.item() == pytest.approx(0.3108, abs=1e-4)
    w = official["state_dict"]["module.conv1.weight"]
    err = (bit_model.conv1.quantized("weight").detach() - w).abs().max().item()
    assert err == pytest.approx(0.00288, abs=1e-5) and err <= 1.4695 / (2 * 255) + 1e-6


def test_regularizer_anchor_5873_88(bit_model):
    """R/TP of the 8-bit conversion = 5873.88 and BGL(conv1) = 94.13 (spec §2.2, App. C)."""
    assert bit_penalty(bit_model).item() == pytest.approx(5873.88, abs=0.01)
    norms = group_norms(bit_model.conv1.pweight, bit_model.conv1.nweight)
    assert norms.sum().item() == pytest.approx(94.13, abs=0.01)
    assert [round(v, 1) for v in norms.tolist()] == [3.6, 9.2, 12.1, 12.8, 13.5, 14.5, 14.2, 14.1]


def test_ones_per_bit_table(bit_model):
    table = layer_table(bit_model).set_index("layer")["ones_pct"]
    assert table["conv1"] == [3.01, 19.68, 34.03, 38.19, 42.36, 48.38, 46.76, 46.30]
    assert table["layer3.2.conv2"] == [0.36, 11.78, 32.73, 42.03, 46.22, 49.02, 49.39, 50.20]
    assert table["fc.bias"] == [40, 50, 50, 50, 70, 50, 40, 40]


def test_official_bit_form_checkpoint_round_trip(official, tmp_path):
    """A bit-form checkpoint in the official layout (Nbit_dict, `module.` keys, shape-(1,) scales) loads back."""
    bit_model = quantize_model(load_official_state(create_model("resnet20"), official))
    for layer in (bit_model.conv1, bit_model.layer3[2].conv2):
        layer.requantize_()
    with torch.no_grad():
        bit_model.layer1[0].conv1.set_precision_(3)
    nbit = {n: [layer.nbits, layer.bias_nbits if layer.has_bias else 0] for n, layer in bit_layers(bit_model)}
    state = {f"module.{k}": (v.reshape(1) if k.endswith("scale") else v) for k, v in bit_model.state_dict().items()}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save({"state_dict": state, "Nbit_dict": nbit, "epoch": 1}, path)
    fresh = quantize_model(create_model("resnet20"))
    load_official_state(fresh, read_official_checkpoint(path))
    assert fresh.layer1[0].conv1.nbits == 3
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh.eval()(x), bit_model.eval()(x))


def test_checkpoint_of_another_architecture_is_rejected(official):
    with pytest.raises(BSQError, match="another architecture"):
        load_official_state(create_model("resnet32"), official)


def test_corrupt_checkpoint_is_rejected(tmp_path):
    bad = tmp_path / "bad.pth.tar"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(BSQError, match="cannot read checkpoint"):
        read_official_checkpoint(bad)
    with pytest.raises(BSQError, match="not found"):
        read_official_checkpoint(tmp_path / "missing.pth")
