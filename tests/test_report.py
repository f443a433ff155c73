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
    error_bars,
    headline,
    load_baselines,
    omitted_published,
    pareto_front,
    plot_layer_bits,
    plot_pareto,
    plot_search_curves,
    published_for,
    published_rows,
    requant_epochs,
    run_record,
    run_summary,
    summarize,
    to_html,
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
    markdown = to_markdown(table)  # one model: its name is in the title, not on every row
    assert markdown.splitlines()[0].startswith("| Method | Source |") and "92.00 ± 1.41" in markdown
    latex = to_latex(table, "CIFAR-10 / ResNet-20")
    assert r"92.00 $\pm$ 1.41" in latex and r"$\alpha$=5e-3" in latex and r"top-1 in \%" in latex


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
    names = ("runs", "csv", "md", "tex", "html", "pareto", "layer_bits", "search_curves")
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
        "FracBits (size of BSQ alpha=5e-3)",
        "FracBits (0.05 MB) [budget missed: +35.0 %]",
        "Uniform QAT (W2)",
        "Uniform QAT (W4)",
    ]
    assert table.iloc[3]["W bits"].startswith("2 (") and table.iloc[1]["W bits"].startswith("MP (")


# ---- paper-style tables ------------------------------------------------------------------------------------------
def _cifar_summary(tmp_path, seeds=(1,)):
    """BSQ at one alpha (one or several seeds) and the FP model, on CIFAR-10 / ResNet-20 (published rows exist)."""
    records = [run_record(_metrics(tmp_path, f"s{s}", 90.0 + s, s)) for s in seeds]
    records.append(run_record(_metrics(tmp_path, "fp", 92.5, 1, stage="pretrain")))  # act_bits 4 in its metrics
    frame = collect_runs(records)
    frame["dataset"], frame["arch"] = "cifar10", "resnet20"
    return summarize(frame)


def test_published_rows_are_sorted_by_method_then_compression_with_short_source_keys(tmp_path):
    table = comparison_table(_cifar_summary(tmp_path), load_baselines(BASELINES))
    published = table[~table["Source"].str.startswith("ours")]
    families = [m.split(" (")[0].lower() for m in published["Method"]]
    assert families == sorted(families)
    bsq = published[published["Method"].str.startswith("BSQ")]
    compression = [float(c) for c in bsq["Comp. (x)"]]
    assert len(compression) >= 3 and compression == sorted(compression)
    assert published["Source"].str.fullmatch(r"\[\d+\]").all()  # "[3]", not a venue string
    keys = list(dict.fromkeys(published["Source"]))
    assert keys == [f"[{i}]" for i in range(1, len(keys) + 1)]  # numbered in order of appearance
    markdown = to_markdown(table)
    for key in keys:  # every key has its footnote with the paper
        assert any(line.startswith(f"- {key} ") and len(line) > 30 for line in markdown.splitlines())
    assert "- [1] BSQ: Exploring Bit-Level Sparsity" in markdown


def test_published_rows_without_any_number_are_left_out(tmp_path):
    baselines = load_baselines(BASELINES)
    summary = _cifar_summary(tmp_path)
    table = comparison_table(summary, baselines)
    assert "BSQ (32-bit activations)" in set(published_for(baselines, "cifar10", "resnet20")["method"])
    assert "BSQ (32-bit activations)" not in set(table["Method"])
    numbers = ["Comp. (x)", "Size (MB)", "BitOPs (G)", "Top-1 (%)", "Top-5 (%)"]
    assert (table[numbers] != "").any(axis=1).all()  # no row without a number
    rows, omitted = published_rows(baselines, "cifar10", "resnet20")
    assert omitted >= 1 and omitted_published(summary, baselines) == omitted and len(rows) == len(table) - 2
    assert f"{omitted} published row(s) without any number" in to_markdown(table, omitted)


def test_full_precision_row_is_32_32_in_every_table(tmp_path):
    table = comparison_table(_cifar_summary(tmp_path), load_baselines(BASELINES))
    fp = table[table["Method"] == "Full precision"].iloc[0]
    assert (fp["W bits"], fp["A bits"]) == ("32", "32")  # not the config's 4-bit activations
    assert "| Full precision | ours (n=1) | 32 | 32 |" in to_markdown(table)
    assert "<td>Full precision</td><td>ours (n=1)</td><td>32</td><td>32</td>" in to_html(table, "t")
    latex_row = next(line for line in to_latex(table, "t").splitlines() if line.startswith("Full precision"))
    assert latex_row.startswith("Full precision & ours (n=1) & 32 & 32 &")


def test_latex_is_a_booktabs_table_of_at_most_nine_columns_with_the_model_in_the_caption(tmp_path):
    table = comparison_table(_cifar_summary(tmp_path, seeds=(1, 2)), load_baselines(BASELINES))
    latex = to_latex(table, "Comparison")
    lines = latex.splitlines()
    for rule in (r"\toprule", r"\midrule", r"\bottomrule"):
        assert rule in lines
    spec = next(line for line in lines if line.startswith(r"\begin{tabular}"))
    assert len(spec.split("{")[2].rstrip("}")) <= 9
    body = lines[lines.index(r"\toprule") + 1 : lines.index(r"\bottomrule")]
    rows = [line for line in body if line.endswith(r"\\")]
    assert len(rows) == len(table) + 1 and all(line.count(" & ") + 1 <= 9 for line in rows)
    caption = next(line for line in lines if line.startswith(r"\caption"))
    assert "cifar10 / resnet20" in caption and r"$^\dagger$ unverified" in caption
    assert not any("cifar10" in line or "resnet20" in line for line in rows)  # not repeated on every row
    assert r"[1]$^\dagger$" in latex and r"\begin{table*}" in latex


def test_numbers_of_a_column_share_one_format(tmp_path):
    table = comparison_table(_cifar_summary(tmp_path), load_baselines(BASELINES))
    for value in table["Comp. (x)"]:
        assert value == "" or len(value.split(".")[1]) == 2
    for value in table["Top-1 (%)"]:
        assert value == "" or len(value.split(" ")[0].split(".")[1]) == 2


# ---- plots -------------------------------------------------------------------------------------------------------
def test_pareto_front_is_the_non_dominated_points():
    frame = pd.DataFrame(
        {
            "compression": [4.0, 8.0, 8.0, 16.0, 10.0, math.nan, 2.0],
            "top1": [90.0, 91.0, 89.0, 85.0, 80.0, 99.0, 95.0],
        }
    )
    # (4, 90) and (8, 89) lose to (8, 91); (10, 80) to (16, 85); (2, 95) is the most accurate; NaN is never on it.
    assert list(pareto_front(frame)) == [False, True, False, True, False, False, True]


def test_error_bars_only_with_two_or_more_seeds(tmp_path):
    frame = pd.DataFrame({"top1_std": [0.5, 0.7, math.nan], "seeds": [1, 2, 3]})
    bars = error_bars(frame)
    assert math.isnan(bars[0]) and bars[1] == 0.7 and math.isnan(bars[2])

    def drawn(summary):
        fig = plot_pareto(summary, None, tmp_path / "p.png")
        return [c for c in fig.axes[0].containers if type(c).__name__ == "ErrorbarContainer"]

    single = _cifar_summary(tmp_path)
    single.loc[single["method"] == "bsq", "top1_std"] = 0.9  # a std from one seed: still no bar
    assert drawn(single) == []
    assert len(drawn(_cifar_summary(tmp_path, seeds=(1, 2)))) == 1


def test_pareto_labels_do_not_overlap_and_ticks_are_plain(tmp_path):
    records = [
        run_record(_method_record(tmp_path, f"u{b}", "uniform", 90.0 + b / 10, 32 / b, bits=b)) for b in (2, 3, 4, 8)
    ]
    records += [run_record(_method_record(tmp_path, f"b{a}", "bsq", 90.2, 10.0, alpha=a)) for a in ("1", "2", "3")]
    summary = summarize(collect_runs(records))
    summary["dataset"], summary["arch"] = "cifar10", "resnet20"
    fig = plot_pareto(summary, load_baselines(BASELINES), tmp_path / "p.png")
    ax = fig.axes[0]
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure is closed: measure on a fresh canvas
    boxes = [t.get_window_extent(renderer) for t in ax.texts]
    assert len(boxes) >= 7 + 5  # our 7 points and the published ones with both numbers
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])
    assert any(t.get_text() == "W3/A3" for t in ax.texts)  # published markers say their bits
    labels = [t.get_text() for t in ax.get_xticklabels(minor=False) if t.get_text()]
    assert labels and all("10^" not in t and "\\times" not in t for t in labels)
    assert all(t.get_text() == "" for t in ax.get_xticklabels(minor=True))


def test_layer_bits_tell_float_layers_from_zero_bit_layers(tmp_path):
    schemes = {
        "bsq/alpha-1": {"conv1": 8, "layer1.conv": 0, "fc": 4},  # the shortcut stays float, layer1.conv lost all bits
        "fracbits/alpha-1": {"conv1": 8, "layer1.conv": 1.5, "layer1.shortcut": 2, "fc": 4},
    }
    fig = plot_layer_bits(schemes, tmp_path / "l.png")
    bsq, fracbits = fig.axes
    assert any(patch.get_hatch() == "///" for patch in bsq.patches)  # float: a hatched slot
    assert any(line.get_marker() == "x" for line in bsq.lines)  # 0 bits: an x at zero
    assert not any(patch.get_hatch() for patch in fracbits.patches)
    legend = [t.get_text() for t in fracbits.get_legend().get_texts()]
    assert legend == ["size of BSQ α=1"] and "kernels" in fracbits.get_title()


def test_search_curves_mark_requantizations_on_integer_epochs(tmp_path):
    history = pd.DataFrame(
        {
            "epoch": [0, 1, 2],
            "proj_avg_bits": [8.0, 5.0, 4.0],
            "bit_sparsity": [0.6, 0.7, 0.75],
            "test_top1": [90.0, 80.0, 85.0],
            "requant_top1_before": [90.0, math.nan, 70.0],
        }
    )
    assert requant_epochs(history) == [0, 2]
    fig = plot_search_curves({"0.3": history}, tmp_path / "s.png")
    for ax in fig.axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks)
        assert sum(line.get_linestyle() == ":" for line in ax.lines) == 2


# ---- terminal summary --------------------------------------------------------------------------------------------
def test_run_summary_gives_the_headline_and_where_everything_is(tmp_path):
    summary = _cifar_summary(tmp_path, seeds=(1, 2))
    lines = headline(summary)
    assert lines[0].startswith("BSQ alpha") and lines[1].split()[0] == "5e-3" and "91.50 ± 0.71" in lines[1]
    assert any(line.startswith("Full precision: top-1 92.50") for line in lines) and len(lines) <= 4
    csv = tmp_path / "t.csv"
    summary.to_csv(csv, index=False)
    tables = {"csv": str(csv), "runs": "r.csv", "md": "t.md", "tex": "t.tex"}
    plots = {"pareto": "p.png"}
    config = {"dataset": "cifar10", "arch": "resnet20", "mlflow": True, "mlflow_uri": "sqlite:///x/mlflow.db"}
    text = run_summary("demo", config, tables, plots, "t.html")
    assert "91.50 ± 0.71" in text and "t.tex" in text and "p.png" in text and "t.html" in text
    assert "snakemake --report" in text and "mlflow ui --backend-store-uri sqlite:///x/mlflow.db" in text
    missing = run_summary("demo", {**config, "mlflow": False}, {**tables, "csv": str(tmp_path / "no.csv")}, plots)
    assert "no headline" in missing and "mlflow ui" not in missing


def test_the_bitops_footnote_names_the_convention_our_rows_used():
    from bsq.report import cost_note

    note = cost_note(pd.DataFrame({"bitops_policy": ["fracbits", "fracbits", ""]}))
    assert note.count("fracbits convention") == 1 and "image input at 8 bits" in note
    assert note.endswith("Published rows: their paper's convention.\n")
    assert cost_note(pd.DataFrame({"top1": [1.0]})) == ""  # records from before the accountant: no claim


def test_every_methods_budget_miss_is_shown_under_its_own_key():
    """FracBits, HAWQ-V3 / MSQ, DNAS and CSQ name their cost error differently; each row shows its miss."""
    from bsq.report import _budget_error

    assert _budget_error({"hard_cost_rel_error": 0.02}) == 0.02  # FracBits
    assert _budget_error({"cost_rel_error": -0.1}) == -0.1  # HAWQ-V3, MSQ
    assert _budget_error({"derived_cost_rel_error": 0.3}) == 0.3  # DNAS
    assert _budget_error({"target": 4.0, "achieved_cost": 5.0}) == pytest.approx(0.25)  # CSQ: from its costs
    assert _budget_error({"budget_met": False}) is None
