"""The method registry: what each method declares, the points a workflow config gives, the config sections and CLI
commands it contributes, and the torch-free promise the Snakefile relies on."""

from __future__ import annotations

import subprocess
import sys

import pytest

from bsq.config import SECTIONS, load_stage_config, stages
from bsq.errors import BSQError
from bsq.layout import OUTPUTS
from bsq.methods import (
    GENERIC_STAGES,
    all_stages,
    config_sections,
    get_method,
    method_names,
    method_of_stage,
    points,
    registry,
    settings_for,
)
from bsq.methods.fracbits import matched_cost

WORKFLOW = {
    "methods": ["bsq", "fracbits", "uniform"],
    "alphas": ["5e-3", 1, "0.3"],
    "fracbits": {"match": "bitops", "targets": [0.08]},
    "uniform_bits": [2, 4],
}


def test_import_of_config_layout_and_registry_loads_no_torch():
    """The Snakefile imports these at every parse; `import torch` alone costs seconds."""
    code = "import sys, bsq.config, bsq.layout, bsq.methods, bsq.methods.fracbits; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_every_method_declares_itself_consistently():
    assert tuple(registry()) == method_names() == ("bsq", "csq", "msq", "fracbits", "hawq", "dnas", "uniform")
    for name, method in registry().items():
        assert method.name == name and method.summary and method.stages
        for spec in method.stages:
            assert method_of_stage(spec.name) is method
            assert OUTPUTS[spec.name] == spec.outputs and "run" in spec.outputs and "metrics" in spec.outputs
            assert spec.runner.startswith(f"bsq.methods.{name}."), "a method's code lives in its own package"
        for section, cls in method.sections.items():
            assert SECTIONS[section] is cls  # every section reaches the stage config


def test_stages_are_the_generic_ones_then_each_methods():
    assert list(all_stages())[:2] == list(GENERIC_STAGES) == ["pretrain", "evaluate"]
    assert stages() == (
        "pretrain",
        "evaluate",
        "search",
        "prune",
        "finetune",
        "csq",
        "msq",
        "fracbits",
        "hawq",
        "dnas",
        "uniform",
    )
    assert method_of_stage("pretrain") is None


def test_bsq_points_keep_the_configs_spelling_and_set_a_float_alpha():
    got = points("bsq", WORKFLOW)
    assert [p.slug for p in got] == ["alpha-5e-3", "alpha-1", "alpha-0.3"]
    assert [p.settings["bsq"]["alpha"] for p in got] == [0.005, 1.0, 0.3]
    assert [p.labels["alpha"] for p in got] == ["5e-3", "1", "0.3"]


def test_fracbits_points_match_each_bsq_run_then_the_explicit_targets():
    got = points("fracbits", WORKFLOW)
    assert [p.slug for p in got] == ["alpha-5e-3", "alpha-1", "alpha-0.3", "target-0.08"]
    matched = got[0]
    assert matched.budget_of == points("bsq", WORKFLOW)[0]
    assert matched.settings == {"fracbits": {"match": "bitops", "cost": "bitops"}}
    assert got[-1].settings == {"fracbits": {"target": 0.08}} and got[-1].budget_of is None
    assert [matched_cost(m) for m in ("compression", "size", "bitops")] == ["size", "size", "bitops"]


def test_fracbits_without_bsq_runs_only_its_targets():
    alone = {**WORKFLOW, "methods": ["fracbits"]}
    assert [p.slug for p in points("fracbits", alone)] == ["target-0.08"]
    with pytest.raises(BSQError, match="nothing sets its targets"):
        get_method("fracbits").check_workflow({**alone, "fracbits": {"match": "compression", "targets": []}})


def test_settings_for_a_slug_and_its_errors():
    assert settings_for("uniform", "bits-4", WORKFLOW).settings == {"qat": {"bits": 4}}
    with pytest.raises(BSQError, match=r"uniform has no point 'bits-3'.*\['bits-2', 'bits-4'\]"):
        settings_for("uniform", "bits-3", WORKFLOW)
    with pytest.raises(
        BSQError, match="unknown method 'haq'; registered methods: bsq, csq, msq, fracbits, hawq, dnas, uniform"
    ):
        get_method("haq")


@pytest.mark.parametrize("method", method_names())
def test_each_points_settings_make_a_valid_stage_config(method):
    for point in points(method, WORKFLOW):
        stage = get_method(method).stages[0].name
        cfg = load_stage_config(stage, {**point.settings, "labels": dict(point.labels), "optim": {"epochs": 5}})
        section, values = next(iter(point.settings.items()))
        assert {k: getattr(getattr(cfg, section), k) for k in values} == values


def test_method_checks_of_the_workflow_config():
    with pytest.raises(BSQError, match="alphas must all be > 0"):
        get_method("bsq").check_workflow({"alphas": ["0", "1"]})
    with pytest.raises(BSQError, match="uniform_bits is empty"):
        get_method("uniform").check_workflow({"uniform_bits": []})
    mismatched = {**WORKFLOW, "stages": {"fracbits": {"fracbits": {"cost": "size"}}}}
    with pytest.raises(BSQError, match="fracbits.match: bitops needs stages.fracbits.fracbits.cost: bitops"):
        get_method("fracbits").check_workflow(mismatched)


def test_config_sections_are_unique_per_name():
    sections = config_sections()
    assert set(sections) == {"bsq", "finetune", "csq", "msq", "fracbits", "hawq", "dnas", "qat"}
    assert sections["qat"] is get_method("uniform").sections["qat"] is get_method("fracbits").sections["qat"]


def test_a_numeric_text_alpha_becomes_a_float_and_text_is_refused():
    assert load_stage_config("search", {"bsq": {"alpha": "5e-3"}}).bsq.alpha == 0.005
    with pytest.raises(BSQError, match="bsq.alpha must be a number > 0"):
        load_stage_config("search", {"bsq": {"alpha": "strong"}})


def test_cli_has_one_command_per_stage_with_the_stages_own_flags():
    from bsq.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["uniform", "--bits", "3", "--out-dir", "x"])
    assert args.config_flags == {"bits": "qat.bits"} and args.bits == 3
    args = parser.parse_args(["finetune", "--allow-unpruned", "--scheme", "s.json"])
    assert args.allow_unpruned is True and args.scheme == "s.json"
    for stage in stages():
        assert parser.parse_args([stage]).command == stage


def test_what_each_stage_reads_names_real_config_keys():
    """A stage's `reads` scopes its MLflow params; a misspelt key would silently drop a setting from the run."""
    import dataclasses

    for spec in all_stages().values():
        for key in spec.reads or ():
            section, _, field = key.partition(".")
            assert section in SECTIONS, (spec.name, key)
            assert not field or field in {f.name for f in dataclasses.fields(SECTIONS[section])}, (spec.name, key)
    assert all_stages()["prune"].reads == ("quant.maxbit", "bsq.overflow")  # prune never reads the search's alpha
