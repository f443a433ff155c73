"""Paper-style tables and plots from finished runs, beside the published numbers for the same dataset and model.

Inputs are the files the stages write (`evaluate/metrics.json`, the training job's `metrics.json`,
`prune/metrics.json`, `search/history.csv`, `scheme.json`): the report never re-computes a number, it only gathers,
averages over seeds and formats. Methods sit side by side: BSQ per alpha, FracBits at each BSQ run's cost (or at an
explicit target), uniform QAT per bit-width, and the full-precision model.
Tables come as CSV (raw numbers, mean and std columns), Markdown, HTML (for the Snakemake report) and LaTeX (booktabs,
9 columns), our rows first, then the published rows with numbers, sorted, with numbered source footnotes; plots are
PNGs (accuracy vs compression with each method's frontier, per-layer bits, BSQ search curves). `run_summary` is the
few lines the workflow prints at the end of a run.
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


def method_title(method: str) -> str:
    """A method's display name: the registry's title ("FracBits", "MSQ (reconstruction)"), "Full precision" for fp."""
    from bsq.methods import registry  # torch-free

    if method == "fp":
        return "Full precision"
    found = registry().get(method)
    return found.title if found is not None else str(method)


def method_rank(method: str) -> int:
    """Table order: the float model, then the methods in registry order (BSQ first), unknown names last."""
    from bsq.methods import method_names

    names = ("fp", *method_names())
    return names.index(method) if method in names else len(names)


def canonical(name: Any) -> str:
    """'CIFAR-10' -> 'cifar10', 'Inception-V3' -> 'inceptionv3', 'resnet20' -> 'resnet20': one key for both worlds."""
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _read_json(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BSQError(f"cannot read {path}: {exc}; re-run the job that writes it") from exc


def _target_unit(labels: dict[str, Any]) -> str:
    """The unit of an explicit target label: GBitOPs, MB, or average bits (CSQ's and MSQ's own targets)."""
    return {"bitops": "G", "size": "MB", "bits": "bits"}.get(str(labels.get("cost", "size")), "")


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
    elif target and not alpha:  # an explicit target (FracBits, CSQ, HAWQ-V3, ...)
        setting = f"{target} {_target_unit(labels)}"
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
        "bitops_policy": m.get("bitops_policy") or "",
        **{k: m.get(k) for k in MEASURES if k in m},
        "source": str(evaluate_metrics),
    }
    trained = _read_json(train_metrics) if train_metrics is not None else {}
    record.update(_fidelity(trained or m))
    if "final_top1" in trained:
        record["top1_final"] = trained["final_top1"]
    if "budget_met" in trained:  # FracBits: did the frozen policy land within tolerance of its target?
        record["budget_error"] = _budget_error(trained)
        record["budget_met"] = bool(trained["budget_met"])
    if prune_metrics is not None:
        record["top1_before_ft"] = _read_json(prune_metrics).get("top1")
    elif "top1_before_ft" in trained:
        record["top1_before_ft"] = trained["top1_before_ft"]
    return record


def _budget_error(trained: Mapping[str, Any]) -> float | None:
    """The saved model's relative cost error to the requested target, under each method's name for it
    (cost_rel_error: FracBits, HAWQ-V3, MSQ; older FracBits runs: hard_cost_rel_error; DNAS: derived_cost_rel_error),
    else from the target and achieved cost (CSQ): every method with a budget_met has its miss shown."""
    for key in ("cost_rel_error", "hard_cost_rel_error", "derived_cost_rel_error"):
        if key in trained:
            return trained[key]
    if trained.get("target") and "achieved_cost" in trained:
        return trained["achieved_cost"] / trained["target"] - 1
    return None


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
        methods = ", ".join(sorted({method_title(m) for m in group["method"]}))
        extra = f", with {changed}" if changed else ""
        lines.append(f"preset `{preset or 'unrecorded'}`{extra}: {methods}")
    return "Fidelity (switch values per preset: README, deviations table): " + "; ".join(lines) + ".\n" if lines else ""


def cost_note(runs: pd.DataFrame) -> str:
    """The BitOPs footnote: the named convention (bsq.cost) our rows were counted under; published rows keep their
    paper's (`bitops_policy` in the baselines sheet), so only rows under one convention compare."""
    from bsq.cost import footnote

    names = sorted({str(n) for n in runs.get("bitops_policy", pd.Series(dtype=str)).dropna() if str(n)})
    if not names:
        return ""
    return " ".join(f"Ours: {footnote(name)}" for name in names) + " Published rows: their paper's convention.\n"


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
    # Paper order: FP, then BSQ by alpha (scratch after finetune), then each method (registry order) by alpha / target
    # / bits.
    out["_order"] = pd.to_numeric(out["alpha"].replace("", None), errors="coerce").fillna(
        pd.to_numeric(out["bits"].replace("", None), errors="coerce")
    )
    out["_order"] = out["_order"].fillna(pd.to_numeric(out["target"].replace("", None), errors="coerce"))
    out["_method"] = out["method"].map(method_rank)
    out["_variant"] = (out["variant"] == "scratch").astype(int)
    out = out.sort_values(["dataset", "arch", "_method", "_variant", "_order"]).drop(
        columns=["_order", "_method", "_variant"]
    )
    return out.reset_index(drop=True)


def label_of(row: pd.Series) -> str:
    name = method_title(row["method"])
    if row["method"] == "bsq" and row["alpha"]:
        name += f" (alpha={row['alpha']})"
    elif row["method"] != "bsq" and row["alpha"]:  # a method run at the cost a BSQ run reached
        name += f" (size of BSQ alpha={row['alpha']})"
    elif row["method"] == "uniform" and row["bits"]:
        name += f" (W{row['bits']})"
    elif row["setting"]:
        name += f" ({row['setting']})"
    if row["variant"] == "scratch":
        name += ", from scratch"
    if row.get("budget_met") is False or row.get("budget_met") == 0:
        error = row.get("budget_error")
        name += " [budget missed]" if error is None or pd.isna(error) else f" [budget missed: {100 * error:+.1f} %]"
    return name


def _w_bits(row: pd.Series) -> str:
    """Nominal weight bits with the average over all weights in brackets: 'MP (4.19)', '2 (2.14)', '32'."""
    if row["method"] == "fp":
        return "32"
    average = _fmt(row["avg_bits"])
    return f"{row['bits']} ({average})" if row["method"] == "uniform" else f"MP ({average})"


def _a_bits(value: Any, method: str = "") -> str:
    if method == "fp":  # the float model: whatever the config's activation bits, nothing is quantized
        return "32"
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "32"
    try:
        return str(int(float(value)))
    except (TypeError, ValueError):
        return str(value)  # "MP": searched per layer


# ---- published baselines -----------------------------------------------------------------------------------------
NUMERIC_BASELINE_COLUMNS = ("model_size_mb", "bitops_g", "compression_rate", "top1", "top5")


def load_baselines(path: str | Path) -> pd.DataFrame:
    """The published-numbers sheet; numeric columns parsed, everything else kept as text."""
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError) as exc:
        raise BSQError(f"cannot read the published baselines {path}: {exc}") from exc
    missing = [c for c in BASELINE_COLUMNS if c not in frame.columns]
    if missing:
        raise BSQError(f"{path} lacks column(s) {missing}; keep the header of config/published_baselines.csv")
    for column in (*NUMERIC_BASELINE_COLUMNS, "fp_top1"):
        # Leading number only: some cells qualify it ("10 (nominal, size <= 0.1 x FP32)"); the notes keep the rest.
        frame[column] = pd.to_numeric(frame[column].str.extract(r"^\s*([0-9]*\.?[0-9]+)")[0], errors="coerce")
    return frame


def published_for(baselines: pd.DataFrame, dataset: str, arch: str) -> pd.DataFrame:
    keep = (baselines["dataset"].map(canonical) == canonical(dataset)) & (
        baselines["model"].map(canonical) == canonical(arch)
    )
    return baselines[keep].reset_index(drop=True)


def published_rows(baselines: pd.DataFrame, dataset: str, arch: str) -> tuple[pd.DataFrame, int]:
    """The published rows the table shows: those with at least one number, sorted by method, then compression
    (BitOPs, size), then accuracy; and how many rows without any number were left out."""
    rows = published_for(baselines, dataset, arch)
    has_number = rows[list(NUMERIC_BASELINE_COLUMNS)].notna().any(axis=1)
    kept = rows[has_number].copy()
    kept["_method"] = kept["method"].str.replace(r"\s*\(.*", "", regex=True).str.lower()  # "BSQ (alpha=..)": BSQ
    kept["_top1"] = -kept["top1"]
    kept = kept.sort_values(
        ["_method", "compression_rate", "bitops_g", "model_size_mb", "_top1", "method"],
        na_position="last",
        kind="stable",
    )
    return kept.drop(columns=["_method", "_top1"]).reset_index(drop=True), int((~has_number).sum())


# ---- tables ------------------------------------------------------------------------------------------------------
def _fmt(mean: float, std: float = math.nan, digits: int | None = 2) -> str:
    """Fixed decimals; digits=None: 3 significant digits, trailing zeros kept (sizes and BitOPs span 0.001 to 100+,
    so every cell of a column shows the same precision: '0.0480', '1.50', '41.5')."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return ""

    def one(value: float) -> str:
        if digits is not None:
            return format(value, f".{digits}f")
        text = format(value, "#.3g")
        return text[:-1] if text.endswith(".") else text

    text = one(mean)
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f" ± {one(std)}"
    return text


OURS = "ours"
STATUS_MARKS = {"unverified": "†", "secondary": "‡"}  # "verified" and our "measured" rows carry no mark
TABLE_MEASURES = ("compression", "size_mb", "bitops_g", "top1_before_ft", "top1", "top1_final", "top5")


def comparison_table(summary: pd.DataFrame, baselines: pd.DataFrame | None) -> pd.DataFrame:
    """Display table: our rows (mean ± std) then the published rows with numbers for the same dataset/model, sorted.

    `Source` is a short key ("ours (n=2)", "[1]"); the hidden `Reference` column holds the full citation the renderers
    list as footnotes. The full-precision row has W/A bits 32/32 in every table."""
    rows: list[dict[str, str]] = []
    for (dataset, arch), ours in summary.groupby(["dataset", "arch"], sort=False):
        for _, r in ours.iterrows():
            rows.append(
                {
                    "Dataset": dataset,
                    "Model": arch,
                    "Method": label_of(r),
                    "Source": f"{OURS} (n={int(r['seeds'])})",
                    "W bits": _w_bits(r),
                    "A bits": _a_bits(r["act_bits"], r["method"]),
                    **{
                        MEASURES[k]: _fmt(r[k], r[f"{k}_std"], None if k in ("size_mb", "bitops_g") else 2)
                        for k in TABLE_MEASURES
                    },
                    "Status": "measured",
                    "Reference": "",
                }
            )
        if baselines is None:
            continue
        published, _ = published_rows(baselines, dataset, arch)
        for _, b in published.iterrows():
            reference = ", ".join(
                part for part in (b["paper"], b["venue_year"], b["source_table"]) if str(part).strip()
            )
            rows.append(
                {
                    "Dataset": dataset,
                    "Model": arch,
                    "Method": b["method"],
                    "Source": "",  # numbered below, in order of first appearance
                    "W bits": re.sub(r"\s*avg\)", ")", str(b["w_bits"])),
                    "A bits": b["a_bits"] or "?",
                    MEASURES["compression"]: _fmt(b["compression_rate"]),
                    MEASURES["size_mb"]: _fmt(b["model_size_mb"], digits=None),
                    MEASURES["bitops_g"]: _fmt(b["bitops_g"], digits=None),
                    MEASURES["top1_before_ft"]: "",
                    MEASURES["top1"]: _fmt(b["top1"]),
                    MEASURES["top1_final"]: "",
                    MEASURES["top5"]: _fmt(b["top5"]),
                    "Status": b["status"],
                    "Reference": reference,
                }
            )
    table = pd.DataFrame(rows)
    if not table.empty:
        keys: dict[str, str] = {}
        for i, reference in table["Reference"].items():
            if reference:
                table.loc[i, "Source"] = keys.setdefault(reference, f"[{len(keys) + 1}]")
    return table


def omitted_published(summary: pd.DataFrame, baselines: pd.DataFrame | None) -> int:
    """How many published rows for these models carry no number at all (left out of the table)."""
    if baselines is None:
        return 0
    pairs = summary[["dataset", "arch"]].drop_duplicates().itertuples(index=False)
    return sum(published_rows(baselines, dataset, arch)[1] for dataset, arch in pairs)


def _display(table: pd.DataFrame) -> tuple[pd.DataFrame, list[str], str]:
    """The visible columns (Dataset/Model dropped when one model: the title names it), the footnotes (source keys,
    then the status marks) and the 'dataset / model' text."""
    shown = table.drop(columns=["Reference"], errors="ignore")
    where = ""
    if not table.empty and table["Dataset"].nunique() == 1 and table["Model"].nunique() == 1:
        where = f"{table['Dataset'].iloc[0]} / {table['Model'].iloc[0]}"
        shown = shown.drop(columns=["Dataset", "Model"])
    notes = []
    if not table.empty:
        seeds = sorted({s for s in table["Source"] if s.startswith(OURS)})
        if seeds:
            notes.append(
                f"{OURS} (n=k): measured by this suite, mean ± sample std over k seeds (no std with one seed); "
                "W bits: nominal (average over all weights)."
            )
        refs = table[table["Reference"] != ""].drop_duplicates("Source")
        notes += [f"{r['Source']} {r['Reference']}." for _, r in refs.iterrows()]
    return shown, notes, where


def to_markdown(table: pd.DataFrame, omitted: int = 0) -> str:
    shown, notes, _ = _display(table)
    cells = [[str(v).replace("|", "\\|") for v in row] for row in shown.itertuples(index=False)]
    header = "| " + " | ".join(shown.columns) + " |"
    rule = "|" + "|".join("---" for _ in shown.columns) + "|"
    lines = [header, rule, *("| " + " | ".join(row) + " |" for row in cells)]
    if omitted:
        notes.append(f"{omitted} published row(s) without any number left out (config/published_baselines.csv).")
    return "\n".join(lines) + "\n" + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")


def to_html(table: pd.DataFrame, title: str, note: str = "", omitted: int = 0) -> str:
    """A standalone HTML page (for the Snakemake report): the table, then the source list and notes."""
    import html

    shown, notes, where = _display(table)
    if omitted:
        notes.append(f"{omitted} published row(s) without any number left out (config/published_baselines.csv).")
    if note:
        notes.append(note.strip())
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown.columns)
    body = "\n".join(
        f'<tr class="{"ours" if str(row[shown.columns.get_loc("Source")]).startswith(OURS) else "published"}">'
        + "".join(f"<td>{html.escape(str(v)).replace('alpha=', 'α=')}</td>" for v in row)
        + "</tr>"
        for row in shown.itertuples(index=False)
    )
    style = (
        "body{font-family:sans-serif;font-size:13px;margin:1em}table{border-collapse:collapse}"
        "th,td{padding:2px 8px;text-align:right;white-space:nowrap}th{border-bottom:2px solid #333}"
        "td:nth-child(-n+2),th:nth-child(-n+2){text-align:left}tr.ours td{background:#eef4fb}"
        "tr.published:first-of-type td,tr.ours+tr.published td{border-top:1px solid #333}"
        "table{border-bottom:2px solid #333}li{margin:2px 0}"
    )
    caption = html.escape(title + (f" ({where})" if where and where not in title else ""))
    items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{caption}</title><style>{style}</style></head>"
        f"<body><h2>{caption}</h2>\n<table><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>\n"
        f"<ul>{items}</ul></body></html>\n"
    )


_LATEX_SPECIAL = {"&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}", "~": r"\~{}"}
_LATEX_SYMBOLS = {"±": r"$\pm$", "†": r"$^\dagger$", "‡": r"$^\ddagger$", "≤": r"$\leq$", "×": r"$\times$"}
# The LaTeX table: 9 columns, so it fits a two-column paper as a table* (dataset and model go to the caption).
LATEX_COLUMNS = {
    "Method": "Method",
    "Source": "Ref.",
    "W bits": "W",
    "A bits": "A",
    MEASURES["compression"]: r"Comp.\ ($\times$)",
    MEASURES["size_mb"]: "Size (MB)",
    MEASURES["bitops_g"]: "BitOPs (G)",
    MEASURES["top1_before_ft"]: "Pre-FT",
    MEASURES["top1"]: "Top-1",
}


def _latex_escape(text: str) -> str:
    text = "".join(_LATEX_SPECIAL.get(ch, _LATEX_SYMBOLS.get(ch, ch)) for ch in str(text))
    return text.replace("alpha=", r"$\alpha$=")


def to_latex(table: pd.DataFrame, caption: str, omitted: int = 0) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs}) in a table* float, 9 columns, ready to \\input; the
    dataset/model, the units, status marks and the source list go to the caption and a note under the table."""
    shown, notes, where = _display(table)
    if "Dataset" in shown:  # several models in one table: keep them apart in the method cell
        shown = shown.assign(Method=shown["Dataset"] + " " + shown["Model"] + ": " + shown["Method"])
    marks = shown["Status"].map(lambda s: STATUS_MARKS.get(str(s), "")) if "Status" in shown else ""
    shown = shown.assign(Source=shown["Source"] + marks)[list(LATEX_COLUMNS)]
    full = f"{caption} ({where})" if where and where not in caption else caption
    used = {m for m in marks if m} if len(shown) else set()
    legend = "; ".join(f"{_latex_escape(m)} {s} number" for s, m in STATUS_MARKS.items() if m in used)
    explain = (
        "Top-1 and pre-finetuning (Pre-FT) top-1 in \\%; W: weight bits (MP: mixed, average in brackets); "
        "A: activation bits" + (f"; {legend}" if legend else "") + "."
    )
    if omitted:
        notes.append(f"{omitted} published row(s) without any number left out.")
    lines = [
        r"\begin{table*}[t]",
        r"\centering\footnotesize",
        r"\setlength{\tabcolsep}{4pt}",
        f"\\caption{{{_latex_escape(full.rstrip('. '))}. {explain}}}",
        f"\\begin{{tabular}}{{ll{'c' * (len(LATEX_COLUMNS) - 2)}}}",
        r"\toprule",
        " & ".join(LATEX_COLUMNS.values()) + r" \\",
        r"\midrule",
    ]
    previous = None
    for row in shown.itertuples(index=False):
        group = str(row[1]).startswith(OURS)
        if previous is not None and group != previous:
            lines.append(r"\midrule")
        previous = group
        lines.append(" & ".join(_latex_escape(v) for v in row) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    if notes:
        lines.append(
            r"\par\smallskip\parbox{\linewidth}{\scriptsize " + r" \\ ".join(_latex_escape(n) for n in notes) + "}"
        )
    lines.append(r"\end{table*}")
    return "\n".join(lines) + "\n"


def headline(summary: pd.DataFrame) -> list[str]:
    """A few lines for the terminal: one line per BSQ alpha (compression, then top-1 of BSQ, of each method run at
    that size and of the train-from-scratch baseline), then the full-precision model and the other rows on one line
    per method."""

    def top1(row: pd.Series) -> str:
        return _fmt(row["top1"], row.get("top1_std", math.nan), 2)

    lines: list[str] = []
    bsq = summary[(summary["method"] == "bsq") & (summary["variant"] == "finetune")]
    if not bsq.empty:
        alphas = summary["alpha"].astype(str)
        matched = summary[(summary["method"] != "bsq") & alphas.isin(bsq["alpha"].astype(str))]
        columns = [(m, "finetune") for m in sorted(set(matched["method"]), key=method_rank)] + [("bsq", "scratch")]
        names = [method_title(m).split(" (")[0] if v == "finetune" else "scratch" for m, v in columns]
        lines.append(
            f"{'BSQ alpha':<10} {'comp. (x)':>9}  {'BSQ':>8}" + "".join(f"  {n:>8}" for n in names) + "   (top-1 %)"
        )
        for _, row in bsq.iterrows():
            same = alphas == str(row["alpha"])
            cells = []
            for method, variant in columns:
                match = summary[same & (summary["method"] == method) & (summary["variant"] == variant)]
                cells.append(top1(match.iloc[0]) if not match.empty else "-")
            lines.append(
                f"{row['alpha']!s:<10} {_fmt(row['compression']):>9}  {top1(row):>8}"
                + "".join(f"  {c:>8}" for c in cells)
            )
    shown = bsq.index.union(summary.index[summary["alpha"].astype(str).isin(bsq["alpha"].astype(str))])
    for method, rows in summary.drop(index=shown).groupby("method", sort=False):
        name = method_title(method)
        if method == "fp":
            lines.append(f"{name}: top-1 {top1(rows.iloc[0])} %")
            continue
        cells = [
            f"{r['setting'] or r['variant']} {top1(r)} % ({_fmt(r['compression'], digits=1)}x)"
            for _, r in rows.iterrows()
        ]
        lines.append(f"{name}: " + ", ".join(cells))
    return lines


def run_summary(
    name: str,
    config: Mapping[str, Any],
    tables: Mapping[str, str],
    plots: Mapping[str, str],
    html_table: str | None = None,
) -> str:
    """The end-of-run text: a headline of the comparison table (from the summary CSV, when it exists), then the paths
    of the tables, plots and report, and the command that opens the MLflow UI."""
    lines = [f"==== {name}: {config.get('dataset')} / {config.get('arch')} ===="]
    summary_csv = Path(tables["csv"])
    if summary_csv.exists():
        try:
            summary = pd.read_csv(summary_csv, dtype=str, keep_default_na=False)
            for column in (*MEASURES, *(f"{k}_std" for k in MEASURES), "seeds", "budget_error"):
                if column in summary:
                    summary[column] = pd.to_numeric(summary[column], errors="coerce")
            if "budget_met" in summary:
                summary["budget_met"] = summary["budget_met"].map({"True": True, "False": False})
            lines += ["  " + line for line in headline(summary)]
        except Exception as exc:  # noqa: BLE001 (a summary never turns a finished run into a failed one)
            lines.append(f"  (no headline: cannot read {summary_csv}: {exc})")
    else:
        lines.append(f"  (no headline: {summary_csv} not written by this run)")
    rows = [
        ("table", f"{tables['md']} (Markdown), {tables['tex']} (LaTeX)"),
        ("table (HTML)", html_table or ""),
        ("CSV", f"{tables['csv']} (mean/std), {tables['runs']} (every run)"),
        ("plots", ", ".join(plots.values())),
        ("report", f"snakemake --report results/{name}_report.html   (then open that file)"),
    ]
    if config.get("mlflow"):
        uri = config.get("mlflow_uri")
        if not uri:
            from bsq.tracking import default_tracking_uri

            uri = default_tracking_uri()
        rows.append(("MLflow", f"mlflow ui --backend-store-uri {uri}"))
    lines += [f"  {key + ':':<13} {value}" for key, value in rows if value]
    return "\n".join(lines)


def print_run_summary(name: str, config: Mapping[str, Any], tables, plots, html_table: str | None = None) -> None:
    print("\n" + run_summary(name, config, tables, plots, html_table), flush=True)


# ---- plots -------------------------------------------------------------------------------------------------------
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on clusters
    import matplotlib.pyplot as plt
    import seaborn as sns

    sns.set_theme(style="whitegrid", context="paper")
    return plt, sns


def pareto_front(frame: pd.DataFrame, x: str = "compression", y: str = "top1") -> pd.Series:
    """True for the non-dominated rows (maximising both x and y): no other row is at least as good in both and
    better in one. Rows with a missing x or y are never on the front."""
    valid = frame[[x, y]].notna().all(axis=1)
    xs, ys = frame[x].to_numpy(), frame[y].to_numpy()
    keep = []
    for i in range(len(frame)):
        if not valid.iloc[i]:
            keep.append(False)
            continue
        dominated = any(
            valid.iloc[j] and xs[j] >= xs[i] and ys[j] >= ys[i] and (xs[j] > xs[i] or ys[j] > ys[i])
            for j in range(len(frame))
        )
        keep.append(not dominated)
    return pd.Series(keep, index=frame.index)


def error_bars(frame: pd.DataFrame, column: str = "top1") -> pd.Series:
    """The std to draw as an error bar: only where a row averages at least 2 seeds (NaN otherwise: no bar)."""
    std = frame.get(f"{column}_std", pd.Series(math.nan, index=frame.index))
    seeds = frame.get("seeds", pd.Series(1, index=frame.index))
    return std.where(pd.to_numeric(seeds, errors="coerce").fillna(1) >= 2)


def _place_labels(ax, items: list[tuple[float, float, str, Any]], fontsize: float = 7) -> None:
    """Label points without overlaps, by hand: try offsets around each point (near first, then farther) and keep
    the first whose text box hits no marker, no placed label and stays inside the axes; else the farthest try,
    with a leader line."""
    fig = ax.figure
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    frame = ax.get_window_extent(renderer)
    boxes = []
    from matplotlib.transforms import Bbox

    for x, y, _, _ in items:  # markers are obstacles too
        px, py = to_px((x, y))
        boxes.append(Bbox.from_extents(px - 5, py - 5, px + 5, py + 5))
    directions = [(1, 1), (1, -1), (-1, 1), (-1, -1), (1, 0), (-1, 0), (0, 1), (0, -1)]
    backing = {"boxstyle": "square,pad=0.1", "facecolor": "white", "alpha": 0.75, "linewidth": 0}
    candidates = [(r * dx, r * dy) for r in (4, 9, 15, 22, 30) for dx, dy in directions]
    for x, y, text, color in items:
        chosen = None
        for dx, dy in candidates:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            label = ax.annotate(
                text, (x, y), xytext=(dx, dy), textcoords="offset points", ha=ha, va=va, fontsize=fontsize,
                color=color, bbox=backing,
            )  # fmt: skip
            box = label.get_window_extent(renderer).expanded(1.04, 1.1)
            inside = frame.contains(box.x0, box.y0) and frame.contains(box.x1, box.y1)
            if inside and not any(box.overlaps(b) for b in boxes):
                chosen = box
                break
            label.remove()
        if chosen is None:  # crowded: the last try, joined to its point
            label = ax.annotate(
                text, (x, y), xytext=(12, 26), textcoords="offset points", fontsize=fontsize, color=color, bbox=backing,
                arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.5},
            )  # fmt: skip
            chosen = label.get_window_extent(renderer)
        boxes.append(chosen)


def _plain_log_axis(axis) -> None:
    """Log scale with plain tick labels ('4', '8', '16'), no '4×10⁰' minor labels."""
    import matplotlib.ticker as ticker

    axis.set_major_locator(ticker.LogLocator(base=2))
    axis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(ticker.LogLocator(base=2, subs=(1.5,)))
    axis.set_minor_formatter(ticker.NullFormatter())


def plot_pareto(summary: pd.DataFrame, baselines: pd.DataFrame | None, path: str | Path):
    """Top-1 vs weight compression: our runs as points with each method's frontier (its non-dominated points) drawn
    as a line, error bars only for rows averaged over >= 2 seeds, the FP model dashed, published points labelled
    with their W/A bits. Returns the figure (closed)."""
    plt, sns = _pyplot()
    ours = summary[summary["method"] != "fp"].copy()
    ours["series"] = ours.apply(
        lambda r: method_title(r["method"]) + (" (from scratch)" if r["variant"] == "scratch" else ""),
        axis=1,
    )
    ours["yerr"] = error_bars(ours)
    fig, ax = plt.subplots(figsize=(7.6, 4.6))
    palette = sns.color_palette("deep", 10)
    labels: list[tuple[float, float, str, Any]] = []
    for i, (name, group) in enumerate(ours.groupby("series", sort=False)):
        color = palette[i % len(palette)]
        group = group.dropna(subset=["compression", "top1"])
        ax.scatter(group["compression"], group["top1"], color=color, s=28, zorder=3, label=name)
        bars = group[group["yerr"].notna()]
        if not bars.empty:
            ax.errorbar(bars["compression"], bars["top1"], yerr=bars["yerr"], fmt="none", ecolor=color, capsize=3)
        front = group[pareto_front(group)].sort_values("compression")
        if len(front) > 1:
            ax.plot(front["compression"], front["top1"], color=color, linewidth=1.4, zorder=2)
        for _, r in group.iterrows():
            text = f"W{r['bits']}" if r["method"] == "uniform" else (f"α={r['alpha']}" if r["alpha"] else r["setting"])
            if text:
                labels.append((r["compression"], r["top1"], text, color))
    for _, fp in summary[summary["method"] == "fp"].iterrows():
        ax.axhline(fp["top1"], color="grey", linestyle="--", linewidth=1, label=f"full precision ({fp['top1']:.1f} %)")
    if baselines is not None and not ours.empty:
        dataset, arch = ours["dataset"].iloc[0], ours["arch"].iloc[0]
        pub = published_for(baselines, dataset, arch).dropna(subset=["compression_rate", "top1"])
        markers = ["s", "^", "D", "v", "P", "X", "<", ">", "p", "h"]
        for j, (method, group) in enumerate(pub.groupby("method", sort=True)):
            ax.scatter(
                group["compression_rate"], group["top1"], marker=markers[j % len(markers)], s=36, color="0.35",
                edgecolor="white", linewidth=0.5, zorder=3, label=f"{method} (published)",
            )  # fmt: skip
            for _, b in group.iterrows():
                w_bits = re.sub(r"\s*\(.*\)", "", str(b["w_bits"])) or "?"
                a_bits = re.sub(r"\s*\(.*\)", "", str(b["a_bits"])) or "?"
                labels.append((b["compression_rate"], b["top1"], f"W{w_bits}/A{a_bits}".replace("WMP", "W-MP"), "0.3"))
    ax.set_xscale("log")  # compression spans 4x to 70x+: equal ratios get equal room
    _plain_log_axis(ax.xaxis)
    ax.set_xlabel("weight compression vs 32-bit (×, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    title = " / ".join(sorted({f"{d} {a}" for d, a in zip(summary["dataset"], summary["arch"], strict=True)}))
    ax.set_title(f"Accuracy vs compression: {title}  (lines: each method's frontier)")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.margins(x=0.08, y=0.08)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())  # freeze the limits so label placement works in final coordinates
    ax.set_ylim(ax.get_ylim())
    fig.tight_layout()
    _place_labels(ax, labels)
    _save(fig, path, layout=False)
    return fig


def _setting_label(method_key: str, slug: str) -> str:
    """Legend text of a scheme key's point: 'α=0.3' (BSQ), 'size of BSQ α=0.3' (FracBits matched to it), ..."""
    kind, _, value = slug.partition("-")
    if kind == "alpha":
        return f"α={value}" if method_key == "bsq" else f"size of BSQ α={value}"
    if kind == "target":
        return f"target {value}"
    if kind == "bits":
        return f"W{value}"
    return slug


def plot_layer_bits(schemes: dict[str, dict[str, float]], path: str | Path):
    """The paper's per-layer precision figure: weight bits of every layer, one bar per point; one panel per method
    (keys "bsq/alpha-5e-3", "fracbits/alpha-5e-3", ...), so BSQ and FracBits allocations at equal cost line up.
    A layer a scheme keeps in float is a hatched grey slot; a 0-bit layer (all bit planes pruned) an x at zero.
    Returns the figure (closed)."""
    plt, sns = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    weights = {
        key: {k: v for k, v in scheme.items() if not k.endswith((".bias", ".act"))} for key, scheme in schemes.items()
    }
    methods = list(dict.fromkeys(key.split("/")[0] for key in weights)) or ["bsq"]
    # model order: the longest scheme first (FracBits quantizes the shortcuts BSQ keeps in float), then the others
    orders = sorted((list(sc) for sc in weights.values()), key=len)
    layers = list(dict.fromkeys(layer for order in reversed(orders) for layer in order))
    top = max([float(v) for sc in weights.values() for v in sc.values()] + [8.0])
    fig, axes = plt.subplots(
        len(methods), 1, figsize=(max(7.0, 0.45 * len(layers) + 3), 3.6 * len(methods)), squeeze=False
    )
    for ax, method in zip(axes[:, 0], methods, strict=True):
        keys = [k for k in weights if k.split("/")[0] == method]
        palette = sns.color_palette("deep", max(len(keys), 1))
        width = 0.8 / max(len(keys), 1)
        handles = []
        fractional = False
        floated = zeroed = False
        for j, key in enumerate(keys):
            scheme = weights[key]
            label = _setting_label(method, key.split("/")[-1])
            handles.append(Patch(color=palette[j], label=label))
            for i, layer in enumerate(layers):
                x = i - 0.4 + width * (j + 0.5)
                bits = scheme.get(layer)
                if bits is None:  # not quantized by this scheme: stays float
                    ax.bar(x, top, width, fill=False, hatch="///", edgecolor="0.7", linewidth=0)
                    floated = True
                elif float(bits) == 0:
                    ax.plot(x, 0, marker="x", color=palette[j], markersize=7, markeredgewidth=2, clip_on=False)
                    zeroed = True
                else:
                    ax.bar(x, float(bits), width, color=palette[j])
                    fractional |= float(bits) != int(float(bits))
        if floated:
            handles.append(Patch(fill=False, hatch="///", edgecolor="0.7", label="kept in float (not quantized)"))
        if zeroed:
            handles.append(
                Line2D([], [], marker="x", color="0.3", linestyle="", markeredgewidth=2, label="0 bits (all pruned)")
            )
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, frameon=False)
        ax.set_xticks(range(len(layers)), layers, rotation=90)
        ax.set_xlim(-0.6, len(layers) - 0.4)
        ax.set_ylim(0, top + 0.5)
        ax.set_ylabel("weight bits")
        name = method_title(method)
        note = (
            "\n(non-integer heights: mean bits over the layer's kernels, kernel-wise precision)" if fractional else ""
        )
        ax.set_title(f"Per-layer weight precision: {name}{note}")
    _save(fig, path)
    return fig


def requant_epochs(history: pd.DataFrame) -> list[int]:
    """Epochs that start with a re-quantization (the search logs its accuracy before/after there)."""
    if "requant_top1_before" not in history or "epoch" not in history:
        return []
    return [int(e) for e in history.loc[history["requant_top1_before"].notna(), "epoch"]]


def plot_search_curves(histories: dict[str, pd.DataFrame], path: str | Path):
    """Average (projected) bits, bit sparsity and test top-1 over the search epochs, one line per alpha; dotted
    lines mark the re-quantizations (at the start of the epoch); integer epoch ticks. Returns the figure (closed)."""
    plt, sns = _pyplot()
    import matplotlib.ticker as ticker
    from matplotlib.lines import Line2D

    frames = []
    requants: set[int] = set()
    for alpha, history in histories.items():
        frame = history.copy()
        frame["alpha"] = str(alpha)
        frames.append(frame)
        requants.update(requant_epochs(history))
    data = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    panels = [("proj_avg_bits", "average bits if re-quantized now"), ("bit_sparsity", "bit sparsity (zero bits)")]
    panels += [("test_top1", "test top-1 (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels) + 1.2, 3.4))
    for ax, (column, label) in zip(axes, panels, strict=True):
        if column in data:
            sns.lineplot(data=data, x="epoch", y=column, hue="alpha", marker="o", markersize=3, ax=ax, legend=False)
        for epoch in sorted(requants):
            ax.axvline(epoch - 0.5, color="0.45", linestyle=":", linewidth=1)
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
        ax.set_ylabel(label)
        ax.set_xlabel("search epoch")
    palette = sns.color_palette(n_colors=max(len(histories), 1))
    handles = [Line2D([], [], color=palette[i], marker="o", label=f"α={a}") for i, a in enumerate(histories)]
    if requants:
        handles.append(Line2D([], [], color="0.45", linestyle=":", label="re-quantization"))
    fig.legend(handles=handles, loc="center right", fontsize=8, frameon=False)
    fig.suptitle("BSQ search progress per alpha (first seed)")
    fig.tight_layout(rect=(0, 0, 1 - 1.5 / fig.get_figwidth(), 1))
    _save(fig, path, layout=False)
    return fig


def _save(fig, path: str | Path, layout: bool = True) -> None:
    import matplotlib.pyplot as plt

    if layout:
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
    """Write the runs CSV, the summary CSV, the Markdown, LaTeX and (optional "html") comparison tables and the
    three plots.

    Each of `evaluations` names an evaluate `metrics.json` ("eval") and optionally the training job's ("train") and
    BSQ's prune metrics ("prune"). `search_histories` are BSQ's, keyed by alpha; `schemes` are keyed
    "<method>/<point>" (first seed). `outputs` names: runs, csv, md, tex, pareto, layer_bits, search_curves and
    optionally html.
    """
    runs = collect_runs(run_record(e["eval"], e.get("prune"), e.get("train")) for e in evaluations)
    summary = summarize(runs)
    published = load_baselines(baselines) if baselines else None
    table = comparison_table(summary, published)
    omitted = omitted_published(summary, published)
    _write(outputs["runs"], runs.to_csv(index=False))
    _write(outputs["csv"], summary.to_csv(index=False))
    note = fidelity_note(runs) + cost_note(runs)
    _write(outputs["md"], f"# {title}\n\n" + to_markdown(table, omitted) + (f"\n{note}" if note else ""))
    _write(outputs["tex"], to_latex(table, f"{title}. {note.strip()}" if note else title, omitted))
    if outputs.get("html"):
        _write(outputs["html"], to_html(table, title, note, omitted))
    plot_pareto(summary, published, outputs["pareto"])
    plot_layer_bits({a: _read_json(p) for a, p in schemes.items()}, outputs["layer_bits"])
    plot_search_curves({a: pd.read_csv(p) for a, p in search_histories.items()}, outputs["search_curves"])
    return summary


def _write(path: str | Path, text: str) -> None:
    write_text_atomic(path, text)  # a reader (or a killed job) never sees half a table
