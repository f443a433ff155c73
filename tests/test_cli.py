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
