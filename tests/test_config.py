"""Stage configs: the paper's recipes as defaults, validation with the key in the message, and a lossless round trip
through the plain dict that checkpoints and MLflow record."""

from __future__ import annotations

import pytest

from bsq.config import STAGES, OptimConfig, config_to_dict, load_stage_config
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
    assert cfg.bsq.alpha == "5e-3" and cfg.bsq.value == 0.005  # the spelling is kept for labels and paths


def test_multistep_schedule_hand_computed():
    optim = OptimConfig(epochs=300, lr=0.01, milestones=[150, 250])
    assert [optim.lr_at(e) for e in (0, 149, 150, 249, 250, 299)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])
    cosine = OptimConfig(epochs=10, lr=0.1, schedule="cosine")
    assert cosine.lr_at(0) == pytest.approx(0.1) and cosine.lr_at(5) == pytest.approx(0.05)


@pytest.mark.parametrize("stage", STAGES)
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
