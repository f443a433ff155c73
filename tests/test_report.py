"""bsq.report: seed averaging, matching published rows, and the three table formats, on hand-made records."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

from bsq.errors import BSQError
from bsq.report import (
    canonical,
    collect_runs,
    comparison_table,
    load_baselines,
    published_for,
    run_record,
    summarize,
    to_latex,
    to_markdown,
    write_report,
)
from tests.conftest import PROJECT_ROOT

BASELINES = PROJECT_ROOT / "config" / "published_baselines.csv"


def _metrics(tmp_path, name, top1, seed, alpha="5e-3", variant=None, stage="finetune"):
    labels = {"dataset": "cifar10", "arch": "resnet20", "method": "bsq", "seed": seed, "alpha": alpha}
    if variant:
        labels["variant"] = variant
    if stage == "pretrain":
        labels.pop("alpha")
    record = {
        "stage": "evaluate",
        "labels": labels,
        "checkpoint_stage": stage,
        "top1": top1,
        "top5": 99.0,
        "avg_bits": 2.0 + seed,
        "compression": 32 / (2.0 + seed),
        "size_mb": 0.1,
        "bitops_g": 0.5,
        "act_bits": 4,
    }
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(record))
    return path


def test_canonical_names_match_the_papers_spelling():
    assert canonical("CIFAR-10") == canonical("cifar10")
    assert canonical("Inception-V3") == canonical("inception_v3")
    assert canonical("ResNet-20") == "resnet20"


def test_seeds_are_averaged_with_sample_std(tmp_path):
    records = [run_record(_metrics(tmp_path, f"s{s}", top1, s)) for s, top1 in ((1, 90.0), (2, 92.0), (3, 94.0))]
    summary = summarize(collect_runs(records))
    assert len(summary) == 1
    row = summary.iloc[0]
    assert row["top1"] == pytest.approx(92.0) and row["top1_std"] == pytest.approx(2.0)  # sample std of 90/92/94
    assert row["avg_bits"] == pytest.approx(4.0) and row["seeds"] == 3


def test_variants_and_fp_are_separate_rows_in_paper_order(tmp_path):
    records = [
        run_record(_metrics(tmp_path, "scratch", 88.0, 1, variant="scratch")),
        run_record(_metrics(tmp_path, "bsq", 91.0, 1)),
        run_record(_metrics(tmp_path, "fp", 92.5, 1, stage="pretrain")),
    ]
    summary = summarize(collect_runs(records))
    assert list(summary["variant"]) == ["pretrain", "finetune", "scratch"]
    assert math.isnan(summary["top1_std"].iloc[0])


def test_published_rows_for_the_same_model_only():
    baselines = load_baselines(BASELINES)
    rows = published_for(baselines, "cifar10", "resnet20")
    assert len(rows) > 5 and set(rows["model"]) == {"ResNet-20"} and set(rows["dataset"]) == {"CIFAR-10"}
    hawq = rows[rows["method"] == "HAWQ"].iloc[0]
    assert hawq["compression_rate"] == pytest.approx(13.11) and hawq["top1"] == pytest.approx(92.22)
    assert published_for(baselines, "digits", "resnet8").empty


def test_qualified_compression_keeps_its_leading_number(tmp_path):
    frame = pd.read_csv(BASELINES, dtype=str, keep_default_na=False)
    frame.loc[0, "compression_rate"] = "10 (nominal, size <= 0.1 x FP32)"
    path = tmp_path / "b.csv"
    frame.to_csv(path, index=False)
    assert load_baselines(path).loc[0, "compression_rate"] == 10.0


def test_baselines_without_the_header_fail_clearly(tmp_path):
    path = tmp_path / "b.csv"
    path.write_text("method,top1\nX,1\n")
    with pytest.raises(BSQError, match="lacks column"):
        load_baselines(path)


def test_tables_show_ours_then_published_with_status(tmp_path):
    records = [run_record(_metrics(tmp_path, f"s{s}", t, s)) for s, t in ((1, 91.0), (2, 93.0))]
    table = comparison_table(summarize(collect_runs(records)), load_baselines(BASELINES))
    assert table.iloc[0]["Method"] == "BSQ (alpha=5e-3)" and table.iloc[0]["Top-1 (%)"] == "92.00 ± 1.41"
    assert table.iloc[0]["Status"] == "measured" and "unverified" in set(table["Status"])
    markdown = to_markdown(table)
    assert markdown.splitlines()[0].startswith("| Dataset | Model | Method") and "92.00 ± 1.41" in markdown
    latex = to_latex(table, "CIFAR-10 / ResNet-20")
    assert r"92.00 $\pm$ 1.41" in latex and r"$\alpha$=5e-3" in latex and r"Top-1 (\%)" in latex


def test_write_report_writes_every_output(tmp_path):
    evaluation = _metrics(tmp_path, "e", 91.0, 1)
    pruned = tmp_path / "prune.json"
    pruned.write_text(json.dumps({"top1": 85.5}))
    history = tmp_path / "history.csv"
    pd.DataFrame(
        {"epoch": [0, 1], "proj_avg_bits": [8.0, 3.0], "bit_sparsity": [0.6, 0.8], "test_top1": [90, 91]}
    ).to_csv(history, index=False)
    scheme = tmp_path / "scheme.json"
    scheme.write_text(json.dumps({"conv1": 8, "fc": 4, "fc.bias": 8}))
    names = ("runs", "csv", "md", "tex", "pareto", "layer_bits", "search_curves")
    outputs = {
        n: tmp_path / "out" / (f"{n}.png" if n in ("pareto", "layer_bits", "search_curves") else f"{n}.x")
        for n in names
    }
    trained = tmp_path / "finetune.json"
    trained.write_text(json.dumps({"final_top1": 90.5}))
    summary = write_report(
        [{"eval": evaluation, "prune": pruned, "train": trained}],
        {"5e-3": history},
        {"bsq/alpha-5e-3": scheme},
        BASELINES,
        outputs,
        "t",
    )
    assert summary.iloc[0]["top1_before_ft"] == 85.5 and summary.iloc[0]["top1_final"] == 90.5
    for name in names:
        assert outputs[name].stat().st_size > 0, name


def _method_record(tmp_path, name, method, top1, compression, seed=1, **labels):
    path = _metrics(tmp_path, name, top1, seed)
    record = json.loads(path.read_text())
    record["labels"] = {**record["labels"], "method": method, **labels}
    if method == "uniform" or "target" in labels:  # only BSQ and the matched FracBits runs have an alpha
        record["labels"].pop("alpha")
    record["compression"] = compression
    path.write_text(json.dumps(record))
    return path


def test_three_methods_side_by_side_with_their_settings(tmp_path):
    """BSQ per alpha, FracBits at a BSQ alpha's budget (its own before-FT accuracy and budget check) or at an
    explicit target, uniform QAT per bit-width: one row each, in paper order, labelled with their setting."""
    fb_train = tmp_path / "fb_train.json"
    fb_train.write_text(
        json.dumps({"final_top1": 89.0, "top1_before_ft": 70.0, "hard_cost_rel_error": 0.004, "budget_met": True})
    )
    missed = tmp_path / "missed.json"
    missed.write_text(json.dumps({"final_top1": 50.0, "hard_cost_rel_error": 0.35, "budget_met": False}))
    records = [
        run_record(_method_record(tmp_path, "u4", "uniform", 90.0, 7.8, bits=4)),
        run_record(_method_record(tmp_path, "u2", "uniform", 88.0, 15.0, bits=2)),
        run_record(_method_record(tmp_path, "fb", "fracbits", 90.5, 14.2), train_metrics=fb_train),
        run_record(_method_record(tmp_path, "fbt", "fracbits", 60.0, 30.0, target="0.05", cost="size"), None, missed),
        run_record(_method_record(tmp_path, "bsq", "bsq", 91.0, 14.24)),
    ]
    summary = summarize(collect_runs(records))
    assert list(zip(summary["method"], summary["setting"], strict=True)) == [
        ("bsq", "5e-3"),
        ("fracbits", "5e-3"),
        ("fracbits", "0.05 MB"),
        ("uniform", "W2"),
        ("uniform", "W4"),
    ]
    fb = summary.iloc[1]
    assert fb["top1_before_ft"] == 70.0 and fb["top1_final"] == 89.0 and bool(fb["budget_met"])
    table = comparison_table(summary, None)
    assert list(table["Method"]) == [
        "BSQ (alpha=5e-3)",
        "FracBits (cost of BSQ alpha=5e-3)",
        "FracBits (0.05 MB) [budget missed: +35.0 %]",
        "Uniform QAT (W2)",
        "Uniform QAT (W4)",
    ]
    assert table.iloc[3]["W bits"].startswith("2 (") and table.iloc[1]["W bits"].startswith("MP (")
