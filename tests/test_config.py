"""Stage configs: the paper's recipes as defaults, validation with the key in the message, and a lossless round trip
through the plain dict that checkpoints and MLflow record."""

from __future__ import annotations

import pytest
import torch

from bsq.config import OptimConfig, config_to_dict, load_stage_config, stages
from bsq.errors import BSQError


@pytest.mark.parametrize(
    "stage, epochs, lr, milestones",
    [("pretrain", 350, 0.1, [150, 250, 325]), ("search", 350, 0.1, [250]), ("finetune", 300, 0.01, [150, 250])],
)
def test_recipe_defaults_are_the_papers(stage, epochs, lr, milestones):
    """Spec §8.1: BSQ 350 ep x0.1@250, finetune 300 ep from 0.01 x0.1@150,250, wd 1e-4, momentum 0.9."""
    cfg = load_stage_config(stage, {})
    assert (cfg.optim.epochs, cfg.optim.lr, cfg.optim.milestones) == (epochs, lr, milestones)
    assert (cfg.optim.weight_decay, cfg.optim.momentum) == (1e-4, 0.9)
    assert cfg.bsq.requant_interval == 100 and cfg.bsq.threshold == 0.0 and cfg.quant.maxbit == 8


def test_user_values_override_only_their_keys():
    cfg = load_stage_config("search", {"optim": {"epochs": 5}, "bsq": {"alpha": "5e-3"}})
    assert cfg.optim.epochs == 5 and cfg.optim.lr == 0.1 and cfg.optim.milestones == [250]
    assert cfg.bsq.alpha == 0.005 and isinstance(cfg.bsq.alpha, float)  # YAML 1.1 reads 5e-3 as text


def test_multistep_schedule_hand_computed():
    optim = OptimConfig(epochs=300, lr=0.01, milestones=[150, 250])
    assert [optim.lr_at(e) for e in (0, 149, 150, 249, 250, 299)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    cosine = OptimConfig(epochs=10, lr=0.1, schedule="cosine")
    assert cosine.lr_at(0) == pytest.approx(0.1) and cosine.lr_at(5) == pytest.approx(0.05)


@pytest.mark.parametrize("stage", stages())
def test_round_trip_through_a_plain_dict(stage):
    cfg = load_stage_config(stage, {"bsq": {"alpha": "2e-2"}, "model": {"arch": "resnet20", "act_bits": 3}})
    assert load_stage_config(stage, config_to_dict(cfg)) == cfg


@pytest.mark.parametrize(
    "values, message",
    [
        ({"optim": {"lrr": 1}}, "unknown key(s) optim.lrr"),
        ({"foo": 1}, "unknown key(s) foo"),
        ({"optim": {"lr": -1}}, "optim.lr must be a number > 0"),
        ({"optim": {"epochs": 2.5}}, "optim.epochs must be an integer"),
        ({"optim": {"milestones": [250, 150]}}, "optim.milestones must be increasing"),
        ({"bsq": {"alpha": 0}}, "bsq.alpha must be a number > 0"),
        ({"bsq": {"alpha": "abc"}}, "bsq.alpha must be a number > 0"),
        ({"bsq": {"threshold": 150}}, "bsq.threshold must be a percentage"),
        ({"model": {"arch": "vgg"}}, "unknown model 'vgg'"),
        ({"quant": {"nbits": 40}}, "quant.nbits must be an integer in 1..16"),
        ({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N"),
        ({"data": {"batch_size": 0}}, "batch_size"),
        ({"data": "digits"}, "data must be a mapping"),
    ],
)
def test_bad_values_name_the_key(values, message):
    with pytest.raises(BSQError) as err:
        load_stage_config("search", values)
    assert message in str(err.value)


def test_config_for_another_stage_is_refused():
    with pytest.raises(BSQError, match="for stage 'search', not 'prune'"):
        load_stage_config("prune", {"stage": "search"})


@pytest.mark.parametrize(
    "stage, values, message",
    [
        ("search", {"optim": {"epochs": 0}}, "the search stage needs optim.epochs >= 1, got 0"),
        ("finetune", {"optim": {"epochs": 0}}, "the finetune stage needs optim.epochs >= 1, got 0"),
        ("uniform", {"optim": {"epochs": 0}}, "the uniform stage needs optim.epochs >= 1, got 0"),
        ("fracbits", {"optim": {"epochs": 1}}, "FracBits needs optim.epochs >= 2 (search, then finetune), got 1"),
        ("fracbits", {"optim": {"epochs": 4}, "fracbits": {"search_epochs": 4}}, "leaves no finetune epoch"),
    ],
)
def test_a_stage_too_short_to_run_fails_when_its_config_is_read(stage, values, message):
    """The epoch minimums live in the config check, so a dry run refuses them instead of the job at its start."""
    with pytest.raises(BSQError) as err:
        load_stage_config(stage, values)
    assert message in str(err.value)


@pytest.mark.parametrize(
    "stage, epochs", [("search", 1), ("finetune", 1), ("uniform", 1), ("fracbits", 2), ("prune", 0), ("evaluate", 0)]
)
def test_the_shortest_runnable_stage_is_accepted(stage, epochs):
    assert load_stage_config(stage, {"optim": {"epochs": epochs}}).optim.epochs == epochs


def test_pretrain_of_zero_epochs_needs_an_import_when_that_is_known():
    """0 epochs only imports a model: refused when the caller knows nothing is imported, left to the stage when the
    import (an input) is not known yet."""
    zero = {"optim": {"epochs": 0}}
    with pytest.raises(BSQError, match="pretrain with optim.epochs = 0 trains nothing"):
        load_stage_config("pretrain", zero, imports_checkpoint=False)
    assert load_stage_config("pretrain", zero, imports_checkpoint=True).optim.epochs == 0
    assert load_stage_config("pretrain", zero).optim.epochs == 0


def test_presets_set_switches_as_a_group_and_explicit_values_win():
    cfg = load_stage_config("search", {"preset": "paper-era", "bsq": {"clamp": "planes"}, "optim": {"epochs": 1}})
    assert (cfg.bsq.clamp, cfg.bsq.overflow, cfg.quant.quantize_shortcuts, cfg.model.stem_act_bits) == (
        "planes",
        "saturate",
        True,
        8,
    )
    assert config_to_dict(cfg)["preset"] == "paper-era" and config_to_dict(cfg)["finetune"]["fc_bias"] == "drop"
    assert load_stage_config("search", {"optim": {"epochs": 1}}).bsq.clamp == "planes"  # the project default


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"preset": "offical"}, "valid presets: default, official-bin, official, paper-era"),
        ({"bsq": {"clamp": "all"}}, "bsq.clamp must be one of planes, official-bin, none"),
        ({"finetune": {"fc_bias": "keep"}}, "finetune.fc_bias must be one of train, drop"),
    ],
)
def test_unknown_preset_or_switch_value_lists_the_valid_ones(values, message):
    with pytest.raises(BSQError, match=message):
        load_stage_config("search", {**values, "optim": {"epochs": 1}})


def test_search_clamp_scopes_differ_as_described():
    from bsq.models import create_model
    from bsq.quant.convert import QuantPolicy, clamp_search_, quantize_model

    def model():
        torch.manual_seed(0)
        m = quantize_model(create_model("resnet8", act_bits=4), QuantPolicy(nbits=2))
        with torch.no_grad():
            for p in m.parameters():
                p.fill_(3.0)
        return m

    planes, official, none = model(), model(), model()
    clamp_search_(planes, "planes")
    clamp_search_(official, "official-bin")
    clamp_search_(none, "none")
    assert planes.layer1[0].conv1.pweight.max() == 2 and planes.layer2[0].downsample[0].weight.max() == 3
    assert official.layer2[0].downsample[0].weight.max() == 2 and official.layer2[0].downsample[1].bias.max() == 2
    assert official.layer1[0].bn1.weight.max() == 3 and official.layer1[0].conv1.scale.item() == 3  # scale, bn kept
    assert all(p.max() == 3 for p in none.parameters())
