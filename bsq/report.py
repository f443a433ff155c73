"""Paper-style tables and plots from finished runs, beside the published numbers for the same dataset and model.

Inputs are the files the stages write (`evaluate/metrics.json`, the training job's `metrics.json`,
`prune/metrics.json`, `search/history.csv`, `scheme.json`): the report never re-computes a number, it only gathers,
averages over seeds and formats. Methods sit side by side: BSQ per alpha, FracBits at each BSQ run's cost (or at an
explicit target), uniform QAT per bit-width, and the full-precision model.
Tables come as CSV (raw numbers, mean and std columns), Markdown and LaTeX; plots are seaborn PNGs.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from bsq.atomic import atomic_write, write_text_atomic
from bsq.errors import BSQError

# Columns averaged over seeds, in table order, with their display names.
MEASURES = {
    "top1": "Top-1 (%)",
    "top1_final": "Top-1 last epoch (%)",
    "top1_before_ft": "Top-1 before FT (%)",
    "top5": "Top-5 (%)",
    "avg_bits": "W bits (avg)",
    "compression": "Comp. (x)",
    "size_mb": "Size (MB)",
    "bitops_g": "BitOPs (G)",
}
KEYS = ("dataset", "arch", "method", "variant", "setting")  # setting: alpha, FracBits target or uniform bits
BASELINE_COLUMNS = (
    "method", "paper", "venue_year", "dataset", "model", "w_bits", "a_bits", "model_size_mb", "bitops_g",
    "compression_rate", "top1", "top5", "fp_top1", "source_table", "notes", "status",
)  # fmt: skip
METHOD_NAMES = {"bsq": "BSQ", "fracbits": "FracBits", "uniform": "Uniform QAT", "fp": "Full precision"}


def canonical(name: Any) -> str:
    """'CIFAR-10' -> 'cifar10', 'Inception-V3' -> 'inceptionv3', 'resnet20' -> 'resnet20': one key for both worlds."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BSQError(f"cannot read {path}: {exc}; re-run the job that writes it") from exc


# ---- our runs ----------------------------------------------------------------------------------------------------
def run_record(
    evaluate_metrics: str | Path,
    prune_metrics: str | Path | None = None,
    train_metrics: str | Path | None = None,
) -> dict[str, Any]:
    """One table row from an evaluate `metrics.json` (labels + measured costs); the training job's metrics add the
    last epoch's accuracy (the table's top-1 is the best epoch, as the authors select), and BSQ's prune metrics (or
    FracBits' own record) the accuracy before finetuning, which the paper reports too."""
    m = _read_json(evaluate_metrics)
    labels = m.get("labels", {})
    variant = labels.get("variant") or ("pretrain" if m.get("checkpoint_stage") == "pretrain" else "finetune")
    method = "fp" if variant == "pretrain" else labels.get("method", "bsq")
    alpha, target, bits = (str(labels.get(k, "")) for k in ("alpha", "target", "bits"))
    if method == "uniform":
        setting = f"W{bits}"
    elif method == "fracbits" and not alpha:
        setting = f"{target} {'G' if labels.get('cost') == 'bitops' else 'MB'}"
    else:
        setting = alpha
    record = {
        "dataset": labels.get("dataset"),
        "arch": labels.get("arch"),
        "method": method,
        "variant": variant,
        "setting": setting,
        "alpha": alpha,
        "target": target,
        "bits": bits,
        "seed": int(labels.get("seed", 0)),
        "act_bits": m.get("act_bits"),
        **{k: m.get(k) for k in MEASURES if k in m},
        "source": str(evaluate_metrics),
    }
    trained = _read_json(train_metrics) if train_metrics is not None else {}
    record.update(_fidelity(trained or m))
    if "final_top1" in trained:
        record["top1_final"] = trained["final_top1"]
    if "budget_met" in trained:  # FracBits: did the frozen policy land within tolerance of its target?
        record["budget_error"] = trained["hard_cost_rel_error"]
        record["budget_met"] = bool(trained["budget_met"])
    if prune_metrics is not None:
        record["top1_before_ft"] = _read_json(prune_metrics).get("top1")
    elif "top1_before_ft" in trained:
        record["top1_before_ft"] = trained["top1_before_ft"]
    return record


def _fidelity(metrics: Mapping[str, Any]) -> dict[str, str]:
    """The preset a model was trained under, and the switches set against it (JSON; empty when none)."""
    from bsq.presets import PRESETS

    preset = str(metrics.get("preset") or "")
    switches = metrics.get("switches") or {}
    changed = {k: v for k, v in switches.items() if preset in PRESETS and PRESETS[preset].get(k, v) != v}
    return {"preset": preset, "switches_changed": json.dumps(changed, sort_keys=True) if changed else ""}


def fidelity_note(runs: pd.DataFrame) -> str:
    """The table's footnote: under which fidelity preset each method's models were trained (and any switch set
    against its preset), so a reader knows whether a row is the authors' behaviour or the project's default."""
    if "preset" not in runs:
        return ""
    lines = []
    keys = runs[["preset", "switches_changed"]].astype("string").fillna("")
    for (preset, changed), group in runs.groupby([keys["preset"], keys["switches_changed"]], sort=True):
        methods = ", ".join(sorted({METHOD_NAMES.get(m, m) for m in group["method"]}))
        extra = f", with {changed}" if changed else ""
        lines.append(f"preset `{preset or 'unrecorded'}`{extra}: {methods}")
    return "Fidelity (switch values per preset: README, deviations table): " + "; ".join(lines) + ".\n" if lines else ""


def collect_runs(records: Iterable[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(list(records))
    if frame.empty:
        raise BSQError("no finished runs to report; run the workflow's evaluate jobs first")
    for column in MEASURES:
        if column not in frame:
            frame[column] = math.nan
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame


def summarize(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds for each (dataset, arch, method, variant, alpha); std is NaN for a single seed."""
    grouped = runs.groupby(list(KEYS), dropna=False, sort=False)
    out = grouped[list(MEASURES)].mean()
    std = grouped[list(MEASURES)].std(ddof=1)
    out = out.join(std.add_suffix("_std"))
    out["seeds"] = grouped["seed"].count()
    for column in ("alpha", "target", "bits", "act_bits"):
        out[column] = grouped[column].first() if column in runs else ""
    if "budget_met" in runs:  # a setting misses its budget when any seed does; the largest miss is shown
        met = runs["budget_met"].map(lambda v: v is not False)
        out["budget_met"] = met.groupby([runs[k] for k in KEYS], dropna=False, sort=False).all()
        out["budget_error"] = grouped["budget_error"].apply(
            lambda v: v.abs().max() * (1 if v.max() >= -v.min() else -1)
        )
    out = out.reset_index()
    # Paper order: FP, then BSQ by alpha (scratch after finetune), FracBits by alpha / target, uniform by bits.
    out["_order"] = pd.to_numeric(out["alpha"].replace("", None), errors="coerce").fillna(
        pd.to_numeric(out["bits"].replace("", None), errors="coerce")
    )
    out["_order"] = out["_order"].fillna(pd.to_numeric(out["target"].replace("", None), errors="coerce"))
    order = {"fp": 0, "bsq": 1, "fracbits": 2, "uniform": 3}
    out["_method"] = out["method"].map(order).fillna(9)
    out["_variant"] = (out["variant"] == "scratch").astype(int)
    out = out.sort_values(["dataset", "arch", "_method", "_variant", "_order"]).drop(
        columns=["_order", "_method", "_variant"]
    )
    return out.reset_index(drop=True)


def label_of(row: pd.Series) -> str:
    name = METHOD_NAMES.get(row["method"], str(row["method"]))
    if row["method"] == "bsq" and row["alpha"]:
        name += f" (alpha={row['alpha']})"
    elif row["method"] == "fracbits" and row["alpha"]:
        name += f" (cost of BSQ alpha={row['alpha']})"
    elif row["method"] == "uniform" and row["bits"]:
        name += f" (W{row['bits']})"
    elif row["setting"]:
        name += f" ({row['setting']})"
    if row["variant"] == "scratch":
        name += ", train from scratch"
    if row.get("budget_met") is False or row.get("budget_met") == 0:
        name += f" [budget missed: {100 * row['budget_error']:+.1f} %]"
    return name


def _w_bits(row: pd.Series) -> str:
    if row["method"] == "fp":
        return "32"
    average = f"{_fmt(row['avg_bits'])} avg"
    return f"{row['bits']} ({average})" if row["method"] == "uniform" else f"MP ({average})"


def _a_bits(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "32"
    try:
        return str(int(float(value)))
    except (TypeError, ValueError):
        return str(value)  # "MP": searched per layer


# ---- published baselines -----------------------------------------------------------------------------------------
def load_baselines(path: str | Path) -> pd.DataFrame:
    """The published-numbers sheet; numeric columns parsed, everything else kept as text."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise BSQError(f"cannot read the published baselines {path}: {exc}") from exc
    missing = [c for c in BASELINE_COLUMNS if c not in frame.columns]
    if missing:
        raise BSQError(f"{path} lacks column(s) {missing}; keep the header of config/published_baselines.csv")
    for column in ("model_size_mb", "bitops_g", "compression_rate", "top1", "top5", "fp_top1"):
        # Leading number only: some cells qualify it ("10 (nominal, size <= 0.1 x FP32)"); the notes keep the rest.
        frame[column] = pd.to_numeric(frame[column].str.extract(r"^\s*([0-9]*\.?[0-9]+)")[0], errors="coerce")
    return frame


def published_for(baselines: pd.DataFrame, dataset: str, arch: str) -> pd.DataFrame:
    keep = (baselines["dataset"].map(canonical) == canonical(dataset)) & (
        baselines["model"].map(canonical) == canonical(arch)
    )
    return baselines[keep].reset_index(drop=True)


# ---- tables ------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float = math.nan, digits: int | None = 2) -> str:
    """Fixed decimals; digits=None: 3 significant digits (sizes and BitOPs span 0.001 to 100+)."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""
    form = ".3g" if digits is None else f".{digits}f"
    text = format(mean, form)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {format(std, form)}"
    return text


def comparison_table(summary: pd.DataFrame, baselines: pd.DataFrame | None) -> pd.DataFrame:
    """Display table: our rows (mean ± std) then the published rows for the same dataset/model."""
    rows: list[dict[str, str]] = []
    for (dataset, arch), ours in summary.groupby(["dataset", "arch"], sort=False):
        for _, r in ours.iterrows():
            rows.append(
                {
                    "Dataset": dataset,
                    "Model": arch,
                    "Method": label_of(r),
                    "Source": f"this suite (n={int(r['seeds'])} seed{'s' if r['seeds'] > 1 else ''})",
                    "W bits": _w_bits(r),
                    "A bits": _a_bits(r["act_bits"]),
                    **{
                        MEASURES[k]: _fmt(r[k], r[f"{k}_std"], None if k in ("size_mb", "bitops_g") else 2)
                        for k in ("compression", "size_mb", "bitops_g", "top1_before_ft", "top1", "top1_final", "top5")
                    },
                    "Status": "measured",
                }
            )
        published = published_for(baselines, dataset, arch) if baselines is not None else []
        for _, b in getattr(published, "iterrows", lambda: [])():
            rows.append(
                {
                    "Dataset": dataset,
                    "Model": arch,
                    "Method": b["method"],
                    "Source": f"{b['venue_year']}".strip(),
                    "W bits": b["w_bits"],
                    "A bits": b["a_bits"],
                    MEASURES["compression"]: _fmt(b["compression_rate"]),
                    MEASURES["size_mb"]: _fmt(b["model_size_mb"], digits=None),
                    MEASURES["bitops_g"]: _fmt(b["bitops_g"], digits=None),
                    MEASURES["top1_before_ft"]: "",
                    MEASURES["top1"]: _fmt(b["top1"]),
                    MEASURES["top1_final"]: "",
                    MEASURES["top5"]: _fmt(b["top5"]),
                    "Status": b["status"],
                }
            )
    return pd.DataFrame(rows)


def to_markdown(table: pd.DataFrame) -> str:
    cells = [[str(v).replace("|", "\\|") for v in row] for row in table.itertuples(index=False)]
    header = "| " + " | ".join(table.columns) + " |"
    rule = "|" + "|".join("---" for _ in table.columns) + "|"
    return "\n".join([header, rule, *("| " + " | ".join(row) + " |" for row in cells)]) + "\n"


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\~{}"}


def _latex_escape(text: str) -> str:
    text = "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))
    return text.replace("±", r"$\pm$").replace("alpha=", r"$\alpha$=")


def to_latex(table: pd.DataFrame, caption: str) -> str:
    """A booktabs tabular in a table float, ready to \\input."""
    spec = "l" * 3 + "l" + "c" * (len(table.columns) - 4)
    lines = [
        r"\begin{table}[t]",
        r"\centering\small",
        f"\\caption{{{_latex_escape(caption)}}}",
        f"\\begin{{tabular}}{{{spec}}}",
        r"\toprule",
        " & ".join(_latex_escape(c) for c in table.columns) + r" \\",
        r"\midrule",
        *(" & ".join(_latex_escape(v) for v in row) + r" \\" for row in table.itertuples(index=False)),
        r"\bottomrule",
        r"\end{tabular}",
        r"\end{table}",
    ]
    return "\n".join(lines) + "\n"


# ---- plots -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def plot_pareto(summary: pd.DataFrame, baselines: pd.DataFrame | None, path: str | Path) -> None:
    """Top-1 vs weight compression: our runs (error bars over seeds) and the published points with both numbers."""
    plt, sns = _pyplot()
    ours = summary[summary["method"] != "fp"].copy()
    ours["series"] = ours.apply(
        lambda r: METHOD_NAMES.get(r["method"], r["method"]) + (" (scratch)" if r["variant"] == "scratch" else ""),
        axis=1,
    )
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for name, group in ours.groupby("series", sort=False):
        group = group.sort_values("compression")
        ax.errorbar(
            group["compression"], group["top1"], yerr=group["top1_std"].fillna(0), marker="o", capsize=3, label=name
        )
        for _, r in group.iterrows():
            text = f"W{r['bits']}" if r["method"] == "uniform" else r["alpha"] or r["setting"]
            if text:
                ax.annotate(text, (r["compression"], r["top1"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    for _, fp in summary[summary["method"] == "fp"].iterrows():
        ax.axhline(fp["top1"], color="grey", linestyle="--", linewidth=1, label=f"FP ({fp['top1']:.1f} %)")
    if baselines is not None and not ours.empty:
        dataset, arch = ours["dataset"].iloc[0], ours["arch"].iloc[0]
        pub = published_for(baselines, dataset, arch).dropna(subset=["compression_rate", "top1"])
        if not pub.empty:
            sns.scatterplot(data=pub, x="compression_rate", y="top1", hue="method", style="method", s=60, ax=ax)
    ax.set_xscale("log")  # compression spans 4x to 70x+: equal ratios get equal room
    ax.xaxis.set_major_formatter(matplotlib_ticker().ScalarFormatter())
    ax.set_xlabel("weight compression vs 32-bit (x, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    title = " / ".join(sorted({f"{d} {a}" for d, a in zip(summary["dataset"], summary["arch"], strict=True)}))
    ax.set_title(f"Accuracy vs compression: {title}")
    ax.legend(fontsize=7, loc="best")
    _save(fig, path)


def matplotlib_ticker():
    import matplotlib.ticker

    return matplotlib.ticker


def plot_layer_bits(schemes: dict[str, dict[str, float]], path: str | Path) -> None:
    """The paper's per-layer precision figure: weight bits of every layer, one bar per alpha; one panel per method
    (keys "bsq/alpha-5e-3", "fracbits/alpha-5e-3", ...), so BSQ and FracBits allocations at equal cost line up."""
    plt, sns = _pyplot()
    rows = [
        {
            "method": METHOD_NAMES.get(key.split("/")[0], key.split("/")[0]),
            "setting": key.split("/")[-1],
            "layer": layer,
            "bits": bits,
        }
        for key, scheme in schemes.items()
        for layer, bits in scheme.items()
        if not layer.endswith((".bias", ".act"))
    ]
    frame = pd.DataFrame(rows)
    methods = list(dict.fromkeys(frame["method"])) if not frame.empty else ["BSQ"]
    # model order: the longest scheme first (FracBits quantizes the shortcuts BSQ keeps in float), then the others
    orders = sorted(([k for k in sc if not k.endswith((".bias", ".act"))] for sc in schemes.values()), key=len)
    layers = list(dict.fromkeys(layer for order in reversed(orders) for layer in order))
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(max(6.4, 0.35 * len(layers) + 2), 3.4 * len(methods)), squeeze=False
    )
    for ax, method in zip(axes[:, 0], methods, strict=True):
        part = frame[frame["method"] == method] if not frame.empty else frame
        if not part.empty:
            sns.barplot(data=part, x="layer", y="bits", hue="setting", order=layers, ax=ax)
            sns.move_legend(ax, "upper left", bbox_to_anchor=(1.0, 1.0), title="")
        ax.set_ylabel("weight bits")
        ax.set_xlabel("")
        ax.tick_params(axis="x", rotation=90)
        ax.set_title(f"Per-layer weight precision: {method}")
    _save(fig, path)


def plot_search_curves(histories: dict[str, pd.DataFrame], path: str | Path) -> None:
    """Average (projected) bits and bit sparsity over the search epochs, one line per alpha."""
    plt, sns = _pyplot()
    frames = []
    for alpha, history in histories.items():
        frame = history.copy()
        frame["alpha"] = alpha
        frames.append(frame)
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    panels = [("proj_avg_bits", "average bits if re-quantized now"), ("bit_sparsity", "bit sparsity (zero bits)")]
    panels += [("test_top1", "test top-1 (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (column, label) in zip(axes, panels, strict=True):
        if column in data:
            sns.lineplot(data=data, x="epoch", y=column, hue="alpha", marker="o", ax=ax)
        ax.set_ylabel(label)
        ax.set_xlabel("search epoch")
    fig.suptitle("BSQ search progress per alpha")
    _save(fig, path)


def _save(fig, path: str | Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    atomic_write(
        path, lambda handle: fig.savefig(handle, format=Path(path).suffix.lstrip(".") or "png", dpi=150), binary=True
    )
    plt.close(fig)


# ---- one call for the workflow -----------------------------------------------------------------------------------
def write_report(
    evaluations: Sequence[Mapping[str, str | Path]],
    search_histories: dict[str, str | Path],
    schemes: dict[str, str | Path],
    baselines: str | Path | None,
    outputs: dict[str, str | Path],
    title: str,
) -> pd.DataFrame:
    """Write the runs CSV, the summary CSV, the Markdown and LaTeX comparison tables and the three plots.

    Each of `evaluations` names an evaluate `metrics.json` ("eval") and optionally the training job's ("train") and
    BSQ's prune metrics ("prune"). `search_histories` are BSQ's, keyed by alpha; `schemes` are keyed
    "<method>/<point>" (first seed). `outputs` names: runs, csv, md, tex, pareto, layer_bits, search_curves.
    """
    runs = collect_runs(run_record(e["eval"], e.get("prune"), e.get("train")) for e in evaluations)
    summary = summarize(runs)
    published = load_baselines(baselines) if baselines else None
    table = comparison_table(summary, published)
    _write(outputs["runs"], runs.to_csv(index=False))
    _write(outputs["csv"], summary.to_csv(index=False))
    note = fidelity_note(runs)
    _write(outputs["md"], f"# {title}\n\n" + to_markdown(table) + (f"\n{note}" if note else ""))
    _write(outputs["tex"], to_latex(table, f"{title}. {note.strip()}" if note else title))
    plot_pareto(summary, published, outputs["pareto"])
    plot_layer_bits({a: _read_json(p) for a, p in schemes.items()}, outputs["layer_bits"])
    plot_search_curves({a: pd.read_csv(p) for a, p in search_histories.items()}, outputs["search_curves"])
    return summary


def _write(path: str | Path, text: str) -> None:
    write_text_atomic(path, text)  # a reader (or a killed job) never sees half a table
