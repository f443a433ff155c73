# Validate the config first, then derive every path, stage config and target from it (no path spelled twice).
import json
import re
import shlex
import sys
from pathlib import Path

import pandas as pd
from snakemake.utils import validate

from bsq.layout import FILE_NAMES, OUTPUTS


def _from_command_line(value):
    """`--config key=value` passes true/false/null as text; read them as YAML would."""
    words = {"true": True, "false": False, "null": None, "none": None}
    return words.get(value.lower(), value) if isinstance(value, str) else value


for _key in ("download", "train_from_scratch", "mlflow", "data_root", "pretrained", "mlflow_uri", "width", "act_bits"):
    if _key in config:
        config[_key] = _from_command_line(config[_key])
validate(config, schema="../schemas/config.schema.yaml")
BASELINES = pd.read_csv(config["baselines"]) if Path(config["baselines"]).is_file() else None
if BASELINES is None:
    raise ValueError(f"baselines: {config['baselines']} not found; point it at config/published_baselines.csv")
validate(BASELINES, schema="../schemas/published_baselines.schema.yaml", set_default=False)

config["seeds"] = [int(seed) for seed in config["seeds"]]  # `--config seeds=[1,2]` arrives as strings
NAME = config["name"]
RUNS = f"results/{NAME}/{config['dataset']}/{config['arch']}"
LOGS = f"logs/{NAME}/{config['dataset']}/{config['arch']}"
BENCH = f"benchmarks/logs/{NAME}/{config['dataset']}/{config['arch']}"
VARIANTS = ["finetune", "scratch"] if config["train_from_scratch"] else ["finetune"]
RUNTIME = {"pretrain": 60, "search": 60, "finetune": 60, "evaluate": 15, **config.get("runtime", {})}


wildcard_constraints:
    alpha="|".join(map(re.escape, config["alphas"])),
    seed=r"\d+",
    variant="finetune|scratch",


# ---- input checks that need more than the schema: fail before any job, naming the key and the fix ----------------
def check_inputs():
    alphas = [float(a) for a in config["alphas"]]
    if min(alphas) <= 0:
        raise ValueError(f"alphas must all be > 0, got {config['alphas']}; alpha = 0 is no BSQ (use uniform QAT)")
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
    for stage in ("pretrain", "search", "prune", "finetune", "evaluate"):
        stage_config(stage, alpha=config["alphas"][0], seed=config["seeds"][0], validate_only=True)


# ---- stage configs: the recipe overrides of config.stages on top of the library's paper defaults --------------
def _merge(base, extra):
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def stage_config(stage, alpha=None, seed=1, variant=None, validate_only=False):
    """The resolved bsq stage config of one job (JSON-ready); checked by bsq.config at parse time."""
    stages = config.get("stages", {})
    base = {
        "stage": stage,
        "seed": int(seed),
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
    if variant == "scratch":
        cfg["labels"] = {"variant": "scratch", "alpha": alpha}
    if validate_only:
        from bsq.config import load_stage_config
        from bsq.errors import BSQError

        try:
            load_stage_config(stage, cfg)
        except BSQError as exc:
            raise ValueError(f"config stages.{stage}: {exc}") from None
    return cfg


def stage_args(stage, variant=None):
    """Params function: the job's stage config as one shell-quoted JSON argument."""

    def args(wildcards):
        alpha, seed = wildcards.get("alpha"), wildcards.get("seed", 1)
        cfg = stage_config(stage, alpha, seed, variant or wildcards.get("variant"))
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


def bsq_dir(alpha="{alpha}", seed="{seed}"):
    return f"{RUNS}/bsq/alpha-{alpha}/seed-{seed}"


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
    return f"{bsq_dir(wildcards.alpha, wildcards.seed)}/{wildcards.variant}/{FILE_NAMES['checkpoint']}"


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
    """(evaluate metrics, prune metrics or None) of every run the tables hold."""
    pairs = [(f"{pretrain_dir(seed)}/eval/metrics.json", None) for seed in config["seeds"]]
    for alpha in config["alphas"]:
        for seed in config["seeds"]:
            for variant in VARIANTS:
                pairs.append(
                    (
                        f"{bsq_dir(alpha, seed)}/eval-{variant}/metrics.json",
                        f"{bsq_dir(alpha, seed)}/prune/metrics.json" if variant == "finetune" else None,
                    )
                )
    return pairs


def aggregate_inputs(wildcards):
    first = config["seeds"][0]  # curves and per-layer bars show the first seed, as the paper's figures
    files = {f"eval_{i}": e for i, (e, _) in enumerate(evaluations())}
    files.update({f"prune_{i}": p for i, (_, p) in enumerate(evaluations()) if p})
    files.update({f"history_{a}": f"{bsq_dir(a, first)}/search/history.csv" for a in config["alphas"]})
    files.update({f"scheme_{a}": f"{bsq_dir(a, first)}/prune/scheme.json" for a in config["alphas"]})
    files["baselines"] = config["baselines"]
    return files


def all_targets():
    return [*TABLES.values(), *PLOTS.values(), f"results/models/{config['arch']}/summary.json"]


check_inputs()
