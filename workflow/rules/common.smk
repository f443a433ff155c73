# Validate the config first (config_checks.smk: one short error per mistake), then derive every path, stage config
# and target from it (no path spelled twice).
import json
import os
import re
import shlex
import sys
from pathlib import Path

from snakemake.utils import validate

from bsq.layout import FILE_NAMES, OUTPUTS

SCHEMA = load_schema(CONFIG_SCHEMA)
type_command_line_values(config, SCHEMA)  # `--config fracbits={match: null}` arrives as text
check_distinct(config)
check_schema(config, SCHEMA)
check_workflow_set_keys(config)
validate(config, schema="../schemas/config.schema.yaml")  # passes now; fills the schema's defaults
BASELINES = read_baselines(config["baselines"])

config["seeds"] = [int(seed) for seed in config["seeds"]]  # `--config seeds=[1,2]` arrives as text
config["uniform_bits"] = [int(bits) for bits in config["uniform_bits"]]
METHODS = config["methods"]
ALPHAS = config["alphas"] if "bsq" in METHODS else []
FRACBITS = config["fracbits"]
NAME = config["name"]
RUNS = f"results/{NAME}/{config['dataset']}/{config['arch']}"
LOGS = f"logs/{NAME}/{config['dataset']}/{config['arch']}"
BENCH = f"benchmarks/logs/{NAME}/{config['dataset']}/{config['arch']}"
VARIANTS = ["finetune", "scratch"] if config["train_from_scratch"] else ["finetune"]
EVAL_THREADS = max(1, config["threads"] // 2)  # prune / evaluate: one pass over the test set
RUNTIME = {"pretrain": 60, "search": 60, "finetune": 60, "evaluate": 15, "fracbits": 60, "uniform": 60}
RUNTIME.update(config.get("runtime", {}))


def method_points(method):
    """The settings a method runs at, as path components: BSQ one per alpha; FracBits one per BSQ alpha (its
    budget matched to that run) plus one per explicit target; uniform QAT one per bit-width."""
    if method == "bsq":
        return [f"alpha-{a}" for a in ALPHAS]
    if method == "fracbits":
        matched = [f"alpha-{a}" for a in ALPHAS] if FRACBITS["match"] else []
        return matched + [f"target-{t}" for t in FRACBITS["targets"]]
    return [f"bits-{b}" for b in config["uniform_bits"]]


def _alternatives(values):
    return "|".join(map(re.escape, values)) or "(?!)"  # (?!) matches nothing: no such run in this config


wildcard_constraints:
    alpha=_alternatives(config["alphas"]),
    seed=r"\d+",
    variant="finetune|scratch",
    method="bsq|fracbits|uniform",
    point=_alternatives(sorted({p for m in METHODS for p in method_points(m)})),
    bits=r"\d+",


# ---- input checks that need more than the schema: fail before any job, naming the key and the fix ----------------
def matched_cost(match):
    """The FracBits cost that `fracbits.match` compares: compression and size match a size target."""
    return "bitops" if match == "bitops" else "size"


def check_inputs():
    alphas = [float(a) for a in config["alphas"]]
    if min(alphas) <= 0:
        raise ValueError(f"alphas must all be > 0, got {config['alphas']}; alpha = 0 is no BSQ (use uniform QAT)")
    if "fracbits" in METHODS and not method_points("fracbits"):
        raise ValueError(
            "methods has fracbits but nothing sets its targets: keep bsq in methods with fracbits.match (one FracBits "
            "run per alpha at that run's cost), or give fracbits.targets"
        )
    stages = config.get("stages", {})
    cost = _merge(stages.get("common", {}), stages.get("fracbits", {})).get("fracbits", {}).get("cost")
    needed = matched_cost(FRACBITS["match"])
    if "fracbits" in METHODS and FRACBITS["match"] and cost not in (None, needed):
        raise ValueError(
            f"fracbits.match: {FRACBITS['match']} needs stages.fracbits.fracbits.cost: {needed}, got {cost} (from "
            "stages.fracbits or stages.common); change one of them"
        )
    if "uniform" in METHODS and not config["uniform_bits"]:
        raise ValueError("methods has uniform but uniform_bits is empty; give the bit-widths, e.g. [2, 3, 4, 8]")
    root = config["data_root"]
    if config["dataset"] != "digits" and root is None:
        raise ValueError(f"data_root is required for dataset {config['dataset']}: --config data_root=/path/to/data")
    if root is not None and not Path(root).is_dir() and not config["download"]:
        raise ValueError(
            f"data_root: {root} does not exist; give the folder holding the {config['dataset']} data "
            "(--config data_root=...), or set download: true for CIFAR-10 where the network allows"
        )
    if config["dataset"] == "imagenet" and root is not None:
        missing = [s for s in ("train", "val") if not (Path(root) / s).is_dir()]
        if missing:
            raise ValueError(f"data_root: {root} lacks {missing}; ImageNet needs train/ and val/ class folders")
    if config["pretrained"] is not None and not Path(config["pretrained"]).is_file():
        raise ValueError(f"pretrained: {config['pretrained']} not found; give a float checkpoint or null to pretrain")
    check_stage_configs()
    check_tracking()


def check_stage_configs():
    """Every stage config the DAG will run, with its real per-job values (each alpha, FracBits point and bit-width),
    through bsq.config: the checks a job would make when it starts, epoch minimums included."""
    seed = config["seeds"][0]
    stage_config("pretrain", seed=seed, validate_only=True)
    stage_config("evaluate", seed=seed, validate_only=True)
    for alpha in ALPHAS:
        for stage in ("search", "prune", "finetune"):
            stage_config(stage, alpha=alpha, seed=seed, validate_only=True)
        if config["train_from_scratch"]:
            stage_config("finetune", alpha=alpha, seed=seed, variant="scratch", validate_only=True)
    for point in method_points("fracbits") if "fracbits" in METHODS else []:
        stage_config("fracbits", seed=seed, point=point, validate_only=True)
    for bits in config["uniform_bits"] if "uniform" in METHODS else []:
        stage_config("uniform", seed=seed, point=f"bits-{bits}", validate_only=True)


def check_tracking():
    """An MLflow store that cannot work fails here, not after minutes of retries in every job."""
    from bsq.errors import BSQError
    from bsq.tracking import check_tracking_uri, default_tracking_uri

    if not config["mlflow"]:
        return
    uri = config["mlflow_uri"] or default_tracking_uri()  # null: $MLFLOW_TRACKING_URI, else SQLite under results/
    env = "MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI") else "mlflow"
    source = "mlflow_uri" if config["mlflow_uri"] else env
    try:
        check_tracking_uri(uri)
    except BSQError as exc:
        raise ValueError(f"{source}: {exc}") from None


# ---- stage configs: the recipe overrides of config.stages on top of the library's paper defaults --------------
def _merge(base, extra):
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def stage_config(stage, alpha=None, seed=1, variant=None, point=None, validate_only=False):
    """The resolved bsq stage config of one job (JSON-ready); checked by bsq.config at parse time."""
    stages = config.get("stages", {})
    base = {
        "stage": stage,
        "seed": int(seed),
        "preset": config.get("preset", "default"),
        "device": config["device"],
        "data": {"name": config["dataset"], "root": config["data_root"], "download": config["download"]},
        "model": {"arch": config["arch"], "act_bits": config["act_bits"], "width": config["width"]},
        "tracking": {
            "enabled": config["mlflow"],
            "uri": config["mlflow_uri"],
            "tags": {"bsq.experiment": NAME, "snakemake.rule": stage},
        },
    }
    # Top-level settings first, then `common`, then the stage's own section (e.g. a float-activation pretrain).
    cfg = _merge(_merge(base, stages.get("common", {})), stages.get(stage, {}))  # prune has no recipe of its own
    if stage == "search":
        cfg = _merge(cfg, {"bsq": {"alpha": alpha}})
    if stage == "fracbits" and point.startswith("alpha-"):  # the target comes from the BSQ run's metrics
        match = FRACBITS["match"]
        cfg = _merge(cfg, {"fracbits": {"match": match}})
        cfg["fracbits"].setdefault("cost", matched_cost(match))
    elif stage == "fracbits":
        cfg = _merge(cfg, {"fracbits": {"target": float(point.removeprefix("target-"))}})
    if stage == "uniform":
        cfg = _merge(cfg, {"qat": {"bits": int(point.removeprefix("bits-"))}})
    if variant == "scratch" and stage == "finetune":  # its evaluation inherits the labels from the checkpoint
        cfg["labels"] = {"variant": "scratch", "alpha": alpha}
    if validate_only:
        from bsq.config import load_stage_config
        from bsq.errors import BSQError

        imports = config["pretrained"] is not None if stage == "pretrain" else None
        try:
            load_stage_config(stage, cfg, imports_checkpoint=imports)
        except BSQError as exc:
            raise ValueError(f"config stages.{stage}: {exc}") from None
    return cfg


def stage_args(stage, variant=None):
    """Params function: the job's stage config as one shell-quoted JSON argument."""

    def args(wildcards):
        alpha, seed, point = wildcards.get("alpha"), wildcards.get("seed", 1), wildcards.get("point")
        if stage == "uniform":
            point = f"bits-{wildcards.bits}"
        cfg = stage_config(stage, alpha, seed, variant or wildcards.get("variant"), point)
        return shlex.quote(json.dumps(cfg, sort_keys=True))

    return args


def launcher():
    """`python -m bsq.cli`, or torchrun with one process per GPU when config.gpus > 1 (DDP)."""
    python = shlex.quote(sys.executable)  # the workflow's own interpreter: no PATH surprises
    if config["gpus"] > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={config['gpus']} -m bsq.cli"
    return f"{python} -m bsq.cli"


def pretrained_input(wildcards):
    return {"pretrained": config["pretrained"]} if config["pretrained"] else {}


def import_flag(wildcards, input):
    """Params function: import the configured float checkpoint instead of training, when there is one."""
    path = getattr(input, "pretrained", None)
    return f"--import-checkpoint {shlex.quote(str(path))}" if path else ""


# ---- paths -------------------------------------------------------------------------------------------------------
def pretrain_dir(seed="{seed}"):
    return f"{RUNS}/pretrain/seed-{seed}"


def run_dir(method="{method}", point="{point}", seed="{seed}"):
    """One run of a method at one setting: results/<name>/<dataset>/<arch>/<method>/<point>/seed-<seed>."""
    return f"{RUNS}/{method}/{point}/seed-{seed}"


def bsq_dir(alpha="{alpha}", seed="{seed}"):
    return run_dir("bsq", f"alpha-{alpha}", seed)


def stage_outputs(stage, directory):
    """Named outputs of a stage in `directory` (file names from bsq.layout)."""
    return {name: f"{directory}/{FILE_NAMES[name]}" for name in OUTPUTS[stage]}


def out_dir(wildcards, output):
    """Params function: the folder of a job's outputs (the CLI's --out-dir)."""
    return str(Path(output[0]).parent)


def initial_bits():
    """Starting precision of the search (stages.search.quant.nbits; the paper's 8)."""
    return config.get("stages", {}).get("search", {}).get("quant", {}).get("nbits", 8)


def evaluated_checkpoint(wildcards):
    """The model an evaluate job measures: `<run>/<variant>/model.pt` (BSQ finetune or scratch, the one-run FracBits
    and uniform QAT jobs write theirs to `finetune/` too)."""
    return f"{run_dir(wildcards.method, wildcards.point, wildcards.seed)}/{wildcards.variant}/{FILE_NAMES['checkpoint']}"


def fracbits_inputs(wildcards):
    """Float model, plus the budget (the BSQ run's prune metrics) when the point matches a BSQ alpha."""
    inputs = {"checkpoint": f"{pretrain_dir(wildcards.seed)}/{FILE_NAMES['checkpoint']}"}
    if wildcards.point.startswith("alpha-"):
        inputs["budget"] = f"{bsq_dir(wildcards.point.removeprefix('alpha-'), wildcards.seed)}/prune/metrics.json"
    return inputs


def budget_flag(wildcards, input):
    """Params function: --budget PATH when the FracBits job matches a BSQ run."""
    return f"--budget {shlex.quote(str(input.budget))}" if hasattr(input, "budget") else ""


# ---- targets -----------------------------------------------------------------------------------------------------
TABLES = {
    "runs": f"results/tables/{NAME}_runs.csv",
    "csv": f"results/tables/{NAME}.csv",
    "md": f"results/tables/{NAME}.md",
    "tex": f"results/tables/{NAME}.tex",
}
PLOTS = {
    "pareto": f"results/plots/{NAME}/pareto.png",
    "layer_bits": f"results/plots/{NAME}/layer_bits.png",
    "search_curves": f"results/plots/{NAME}/search_curves.png",
}


def evaluations():
    """Every row of the tables: {"eval": evaluate metrics, "train": the training job's metrics, and for BSQ's
    finetune "prune": the pruned model's metrics (the paper's accuracy before finetuning)}."""
    rows = [
        {"eval": f"{pretrain_dir(seed)}/eval/metrics.json", "train": f"{pretrain_dir(seed)}/metrics.json"}
        for seed in config["seeds"]
    ]
    for method in METHODS:
        for point in method_points(method):
            for seed in config["seeds"]:
                for variant in VARIANTS if method == "bsq" else ["finetune"]:
                    run = run_dir(method, point, seed)
                    row = {"eval": f"{run}/eval-{variant}/metrics.json", "train": f"{run}/{variant}/metrics.json"}
                    if method == "bsq" and variant == "finetune":
                        row["prune"] = f"{run}/prune/metrics.json"
                    rows.append(row)
    return rows


def scheme_files():
    """Per-layer bits of the first seed for the layer plot: BSQ per alpha, FracBits per point."""
    first = config["seeds"][0]  # curves and per-layer bars show the first seed, as the paper's figures
    files = {}
    for method in ("bsq", "fracbits"):
        for point in method_points(method) if method in METHODS else []:
            stage = "prune" if method == "bsq" else "finetune"
            files[f"{method}/{point}"] = f"{run_dir(method, point, first)}/{stage}/scheme.json"
    return files


def aggregate_inputs(wildcards):
    first = config["seeds"][0]
    files = {f"{kind}_{i}": path for i, row in enumerate(evaluations()) for kind, path in row.items()}
    files.update({f"history_{a}": f"{bsq_dir(a, first)}/search/history.csv" for a in ALPHAS})
    files.update({f"scheme_{i}": path for i, path in enumerate(scheme_files().values())})
    files["baselines"] = config["baselines"]
    return files


def all_targets():
    """Tables, plots, the model card and every trained model's metrics: a deleted training output is a missing target,
    so `snakemake` redoes that branch (the job, its evaluation, the tables) and nothing else."""
    trained = [row["train"] for row in evaluations()]
    return [*TABLES.values(), *PLOTS.values(), f"results/models/{config['arch']}/summary.json", *trained]


check_inputs()
