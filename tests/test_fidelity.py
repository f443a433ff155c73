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


class _Batches(list):
    """A one-batch loader (the Trainer only needs iteration, len and set_epoch)."""

    def set_epoch(self, epoch: int) -> None:
        pass


@pytest.mark.parametrize("includes_start", [False, True])
def test_best_includes_start_keeps_the_untrained_state_when_training_only_hurts(includes_start):
    """Spec §5.2: the authors' epoch 0 (pruned, not finetuned) is a best-epoch candidate. A 1-d problem the start
    weights solve (test top-1 100 %), trained on flipped labels with lr 10: every trained epoch scores 0 %."""
    from bsq.config import OptimConfig
    from bsq.engine import Distributed, Trainer, evaluate

    x = torch.tensor([[1.0], [-1.0]])
    model = torch.nn.Linear(1, 2, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))
    train, test = _Batches([(x, torch.tensor([1, 0]))]), _Batches([(x, torch.tensor([0, 1]))])
    optim = OptimConfig(epochs=2, lr=10.0, momentum=0.0, weight_decay=0.0, schedule="constant")
    trainer = Trainer(model, train, test, optim, seed=0, dist=Distributed(), keep_best=True)
    if includes_start:
        trainer.add_start_candidate(evaluate(model, test, torch.device("cpu")))
    result = trainer.fit()
    assert [row["test_top1"] for row in result.history] == [0.0, 0.0]
    # One SGD step on the flipped labels: dCE/dw = (sigmoid(2), -sigmoid(2)) for both samples, so w0 -+ 10 sigmoid(2).
    step = 10.0 * torch.sigmoid(torch.tensor(2.0))
    expected = torch.tensor([[1.0], [-1.0]]) if includes_start else torch.stack([1 - step, step - 1]).reshape(2, 1)
    assert result.best["epoch"] == (-1 if includes_start else 0)
    assert result.best["test_top1"] == (100.0 if includes_start else 0.0)
    torch.testing.assert_close(result.best_state["weight"], expected)
