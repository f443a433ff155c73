"""Self-describing checkpoints: rebuild every form exactly, atomic writes, clear errors for bad files."""

from __future__ import annotations

import pytest
import torch

from bsq import checkpoint as C
from bsq.errors import BSQError
from bsq.models import create_model
from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model, requantize_model, set_form_

ARGS = {"arch": "resnet8", "num_classes": 10, "act_bits": 4, "stem_act_bits": None, "in_channels": 1, "width": 4}


def _model(form: str):
    torch.manual_seed(0)
    args = dict(ARGS)
    model = create_model(args.pop("arch"), **args)
    if form == "float":
        return model
    quantize_model(model, QuantPolicy(nbits=6))
    with torch.no_grad():
        layer = dict(bit_layers(model))["layer1.0.conv2"]
        layer.pweight.zero_(), layer.nweight.zero_()  # an all-zero layer -> 0 bits in latent form
    requantize_model(model)
    if form == "latent":
        set_form_(model, "latent")
    return model


@pytest.mark.parametrize("form", ["float", "bits", "latent"])
def test_checkpoint_rebuilds_the_same_function(tmp_path, form):
    model = _model(form).eval()
    path = C.save_checkpoint(tmp_path / "m.pt", C.make_checkpoint(model, stage="t", model_args=ARGS, policy={}))
    ckpt = C.load_checkpoint(path)
    assert ckpt["form"] == form and ckpt["bsq_version"]
    rebuilt = C.load_model(ckpt).eval()
    assert C.layer_precisions(rebuilt) == C.layer_precisions(model)
    if form == "latent":
        assert C.layer_precisions(rebuilt)["layer1.0.conv2"] == 0
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(model(x), rebuilt(x))


def test_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "m.pt"
    C.save_checkpoint(path, {"format": C.FORMAT, "v": 1})
    before = path.read_bytes()

    def broken(obj, f):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken)
    with pytest.raises(OSError):
        C.save_checkpoint(path, {"format": C.FORMAT, "v": 2})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(BSQError, match="not found"):
        C.load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00" * 100)
    with pytest.raises(BSQError, match="corrupt or incomplete"):
        C.load_checkpoint(tmp_path / "junk.pt")
    torch.save({"state_dict": {}, "epoch": 3}, tmp_path / "official.pth.tar")
    with pytest.raises(BSQError, match="authors' code"):
        C.load_checkpoint(tmp_path / "official.pth.tar")


def test_edited_state_dict_is_refused(tmp_path):
    model = _model("bits")
    payload = C.make_checkpoint(model, stage="t", model_args=ARGS, policy={})
    payload["state_dict"].pop("conv1.scale")
    with pytest.raises(BSQError, match="missing \\['conv1.scale'\\]"):
        C.load_model(payload)


@pytest.mark.parametrize("arch", ["resnet18", "inception_v3"])
def test_torchvision_imagenet_weights_load_as_a_pretrained_start(arch):
    """`pretrained:` may be torchvision's ImageNet state dict; Inception's training-only AuxLogits are dropped."""
    import torchvision

    from bsq.models import create_model
    from bsq.official import load_official_state

    reference = getattr(torchvision.models, arch)(
        **({"init_weights": True, "aux_logits": True} if "incep" in arch else {})
    )
    ours = create_model(arch, num_classes=1000, act_bits=None)
    load_official_state(ours, {"state_dict": reference.state_dict()})
    key = "fc.weight"
    assert torch.equal(ours.state_dict()[key], reference.state_dict()[key])


class _ScaledLinear(torch.nn.Linear):
    """A toy training layer of a method's own form: a learnable gain per output, its precision carried along."""

    checkpoint_form = "toy-gain"

    def __init__(self, linear: torch.nn.Linear, nbits: int) -> None:
        super().__init__(linear.in_features, linear.out_features)
        self.gain = torch.nn.Parameter(torch.ones(linear.out_features))
        self.nbits = nbits

    def forward(self, x):
        return super().forward(x) * self.gain

    def precisions(self) -> dict[str, int]:
        return {"": self.nbits}


def _toy_build(model, policy, precisions):
    model.fc = _ScaledLinear(model.fc, precisions["fc"])
    return model


def test_a_methods_own_training_form_round_trips(tmp_path, monkeypatch):
    """A resume file of a method's training model (Method.forms) records its form and precisions and rebuilds."""
    import bsq.methods

    monkeypatch.setattr(bsq.methods, "form_builder", lambda form: _toy_build if form == "toy-gain" else None)
    model = _toy_build(create_model("resnet8", 10, width=4, in_channels=1), None, {"fc": 5})
    with torch.no_grad():
        model.fc.gain.mul_(1.5)
    assert C.model_form(model) == "toy-gain" and C.layer_precisions(model) == {"fc": 5}
    args = {"arch": "resnet8", "num_classes": 10, "width": 4, "in_channels": 1}
    path = C.save_checkpoint(
        tmp_path / "resume.pt", C.make_checkpoint(model, stage="toy", model_args=args, policy=None)
    )
    loaded = C.load_model(C.load_checkpoint(path))
    x = torch.randn(2, 1, 8, 8)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x)) and loaded.fc.nbits == 5
    monkeypatch.setattr(bsq.methods, "form_builder", lambda form: None)
    with pytest.raises(BSQError, match="unknown checkpoint form 'toy-gain'"):
        C.load_model(C.load_checkpoint(path))
