"""The `bsq` CLI: inspect writes the card the workflow collects; bad input exits 2 with the fix."""

import json

import pandas as pd
import pytest

from bsq.cli import main


def test_inspect_writes_table_and_summary(tmp_path):
    assert main(["inspect", "--arch", "resnet20", "--nbits", "8", "--out-dir", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    table = pd.read_csv(tmp_path / "layers.csv")
    assert summary["compression"] == 4.0 and summary["quantized_params"] == 268_346
    assert len(table) == 21 and table["params"].sum() == 268_346 and set(table["bits"]) == {8}


@pytest.mark.parametrize(
    "argv, message",
    [
        (["inspect", "--arch", "resnet21", "--out-dir", "x"], "unknown model 'resnet21'"),
        (["inspect", "--arch", "resnet20", "--checkpoint", "nope.pth", "--out-dir", "x"], "checkpoint not found"),
        (["inspect", "--arch", "resnet20", "--nbits", "40", "--out-dir", "x"], "bits must be an integer in 0..16"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x" / "summary.json").exists()


def test_stage_subcommands_chain_through_the_cli(tmp_path, capsys):
    """pretrain -> search -> prune via the CLI flags: --set, shortcuts, --out-dir, --checkpoint; later stages take
    the model and dataset from their input checkpoint."""
    common = ["--data", "digits", "--device", "cpu", "--no-tracking", "--set", "data.train_subset=128"]
    common += ["--set", "model.width=4", "--set", "data.test_subset=64"]
    assert main(["pretrain", *common, "--arch", "resnet8", "--epochs", "1", "--out-dir", str(tmp_path / "p")]) == 0
    first = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert first["stage"] == "pretrain" and 0 <= first["top1"] <= 100
    search = ["search", *common, "--arch", "resnet8", "--epochs", "1", "--alpha", "5e-3"]
    assert main([*search, "--checkpoint", str(tmp_path / "p" / "model.pt"), "--out-dir", str(tmp_path / "s")]) == 0
    # prune names no arch, width or dataset: they come from the search checkpoint; explicit ones must match it
    searched = str(tmp_path / "s" / "model.pt")
    assert main(["prune", "--arch", "resnet20", "--no-tracking", "--checkpoint", searched, "--out-dir", "x"]) == 2
    assert "holds a resnet8 but model.arch is 'resnet20'" in capsys.readouterr().err
    bare = ["--device", "cpu", "--no-tracking", "--set", "data.test_subset=64"]
    assert main(["prune", *bare, "--checkpoint", searched, "--out-dir", str(tmp_path / "q")]) == 0
    scheme = json.loads((tmp_path / "q" / "scheme.json").read_text())
    assert set(scheme) >= {"conv1", "fc", "fc.bias"}
    run = json.loads((tmp_path / "q" / "run.json").read_text())
    assert run["run_id"] is None and [e["stage"] for e in run["lineage"]] == ["pretrain", "search", "prune"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["search", "--alpha", "1e-3", "--checkpoint", "m.pt", "--out-dir", "o"], "not found"),
        (["search", "--set", "optim.lrr=1", "--out-dir", "o"], "unknown key(s) optim.lrr"),
        (["search", "--set", "bsq.alpha=-1", "--out-dir", "o"], "bsq.alpha must be a number > 0"),
        (["prune", "--set", "nonsense", "--out-dir", "o"], "--set expects NAME=VALUE"),
        (["prune", "--out-dir", "o"], "needs input(s) ['checkpoint']"),
        (["evaluate", "--input", "foo=x", "--out-dir", "o"], "unknown input(s) ['foo']"),
    ],
)
def test_bad_stage_input_exits_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
