# Validate the config first (config_checks.smk: one short error per mistake), then build ONE table of runs (method x
# point x seed, the points from the method registry, bsq.methods) and derive every path, stage config, wildcard
# constraint and target from it. Torch-free: parsing the workflow imports bsq.config, bsq.layout and bsq.methods only.
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from snakemake.utils import validate

from bsq.errors import BSQError
from bsq.layout import FILE_NAMES, OUTPUTS
from bsq.methods import Point, get_method, method_of_stage, points, registry

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
NAME = config["name"]
RUNS = f"results/{NAME}/{config['dataset']}/{config['arch']}"
LOGS = f"logs/{NAME}/{config['dataset']}/{config['arch']}"
BENCH = f"benchmarks/logs/{NAME}/{config['dataset']}/{config['arch']}"


# ---- the runs table: every (method, point, seed) this config runs, built once -------------------------------------
@dataclass(frozen=True)
class Run:
    method: str
    point: Point  # slug (path component), settings (stage config overlay), labels, budget_of (matched BSQ point)
    seed: int

    @property
    def dir(self):
        return run_dir(self.method, self.point.slug, self.seed)

    def variants(self):
        """The folders of this run whose model.pt the evaluate stage measures (one table row each)."""
        evaluated = get_method(self.method).evaluated
        return [v for v in evaluated if v != "scratch" or config["train_from_scratch"]]


def _points(method):
    try:
        return points(method, config)
    except BSQError as exc:
        raise ValueError(f"methods: {method}: {exc}") from None


POINTS = {method: _points(method) for method in METHODS}  # method -> its points, in config order
RUN_TABLE = [Run(method, point, seed) for method in METHODS for point in POINTS[method] for seed in config["seeds"]]


def point_of(method, slug):
    """The Point a job's {method}/{point} wildcards name (the wildcard constraints admit only the table's)."""
    return next(p for p in POINTS[method] if p.slug == slug)


def runs_of(method):
    return [run for run in RUN_TABLE if run.method == method]


def _alternatives(values):
    return "|".join(map(re.escape, dict.fromkeys(values))) or "(?!)"  # (?!) matches nothing: no such run here


def slugs(*methods):
    """Wildcard constraint: the point slugs of these methods (all of this config's methods when none given)."""
    return _alternatives(p.slug for m in methods or METHODS for p in POINTS.get(m, []))


wildcard_constraints:
    seed=r"\d+",
    method=_alternatives(METHODS),
    point=slugs(),
    variant=_alternatives(v for m in METHODS for v in get_method(m).evaluated),


# ---- input checks that need more than the schema: fail before any job, naming the key and the fix ----------------
def check_inputs():
    for method in METHODS:
        try:
            get_method(method).check_workflow(config)  # the method's own cross-key checks
        except BSQError as exc:
            raise ValueError(str(exc)) from None
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
    """Every stage config the DAG will run, with its real per-job values (each point of each method), through
    bsq.config: the checks a job would make when it starts, epoch minimums included. One seed: seeds change no
    check."""
    seed = config["seeds"][0]
    validate_stage_config("pretrain", stage_config("pretrain", seed))
    validate_stage_config("evaluate", stage_config("evaluate", seed))
    for run in (run for run in RUN_TABLE if run.seed == seed):
        for spec in get_method(run.method).stages:
            validate_stage_config(spec.name, stage_config(spec.name, seed, run.point))
        if "scratch" in run.variants():
            validate_stage_config("finetune", stage_config("finetune", seed, run.point, variant="scratch"))


def validate_stage_config(stage, cfg):
    from bsq.config import load_stage_config

    imports = config["pretrained"] is not None if stage == "pretrain" else None
    try:
        load_stage_config(stage, cfg, imports_checkpoint=imports)
    except BSQError as exc:
        raise ValueError(f"config stages.{stage}: {exc}") from None


def check_tracking():
    """An MLflow store that cannot work fails here, not after minutes of retries in every job."""
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


# ---- stage configs: top-level settings, then stages.common, stages.<stage>, then the point's settings ------------
def _merge(base, extra):
    out = dict(base)
    for key, value in (extra or {}).items():
        out[key] = _merge(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


def stage_config(stage, seed, point=None, variant=None):
    """The bsq stage config of one job (JSON-ready): the point's settings (bsq.methods) put the run's first stage at
    its alpha, target or bit-width, and its labels name every job of the run in MLflow and the tables."""
    stages = config.get("stages", {})
    base = {
        "stage": stage,
        "seed": int(seed),
        "preset": config.get("preset", "default"),
        "device": config["device"],
        "data": {"name": config["dataset"], "root": config["data_root"], "download": config["download"]},
        "model": {"arch": config["arch"], "act_bits": config["act_bits"], "width": config["width"]},
        "tracking": {  # one MLflow experiment per config name; each job a child of the invocation's run (Snakefile)
            "enabled": config["mlflow"],
            "uri": config["mlflow_uri"],
            "experiment": NAME,
            "tags": {"bsq.experiment": NAME, "snakemake.rule": stage},
        },
    }
    # Top-level settings first, then `common`, then the stage's own section (prune has none), then the point.
    cfg = _merge(_merge(base, stages.get("common", {})), stages.get(stage, {}))
    labels = {}
    if point is not None:
        if stage == get_method(point.method).stages[0].name:  # the job that starts the run; later ones read its
            cfg = _merge(cfg, point.settings)  # checkpoint (BSQ: prune and finetune keep the search's alpha)
        labels.update(point.labels)
    if variant == "scratch":  # the float parent knows no alpha: the labels carry the run's
        labels["variant"] = "scratch"
    if labels:
        cfg["labels"] = labels
    return cfg


def job_params(stage, variant=None):
    """Params of a stage job: its `bsq` subcommand, its stage config as one shell-quoted JSON argument (at the point
    its wildcards name: {method} where the rule has it, else the method owning the stage), its inputs as CLI flags,
    its output folder and its launcher (stage None: the template's, which refuse to run)."""

    def config_json(wildcards):
        point = None
        if "point" in wildcards.keys():
            point = point_of(wildcards.get("method") or method_of_stage(stage).name, wildcards.point)
        cfg = stage_config(stage, wildcards.get("seed", 1), point, variant or wildcards.get("variant"))
        return shlex.quote(json.dumps(cfg, sort_keys=True))

    if stage is None:
        stage = config_json = template_only
    return {"stage": stage, "config": config_json, "inputs": input_flags, "out_dir": out_dir, "launch": launch}


# The command of every stage job (the template's, and the one-stage methods' rules).
STAGE_SHELL = (
    "{params.launch} {params.stage} --config-json {params.config} {params.inputs} --out-dir {params.out_dir}"
    " > {log} 2>&1"
)


def one_stage_methods():
    """Registered methods whose whole run is one stage from the float model, evaluated in its `finetune/` folder
    (FracBits, uniform QAT): the workflow gives each a rule of its own (baselines.smk), no rule file needed."""
    return [
        name
        for name, method in registry().items()
        if len(method.stages) == 1 and tuple(method.stages[0].inputs) == ("checkpoint",)
        and tuple(method.evaluated) == ("finetune",)
    ]


# ---- how a job starts, and what it may use ----------------------------------------------------------------------
def launcher(processes):
    """`python -m bsq.cli` (the workflow's own interpreter: no PATH surprises), or torchrun with one process per GPU
    when the job holds more than one (DDP)."""
    python = shlex.quote(sys.executable)
    if processes > 1:
        return f"{python} -m torch.distributed.run --standalone --nproc_per_node={processes} -m bsq.cli"
    return f"{python} -m bsq.cli"


def launch(wildcards, resources):
    """Params function: the launcher for the GPUs this job holds (its `gpu` resource: `gpus` of the config for a
    training job, at most one for a pass over the test set), so torchrun and the scheduler always agree."""
    return launcher(int(resources.get("gpu", 0)))


def machine(stage=None, one_pass=False):
    """A job's resources: `gpu` from the config's `gpus` (a training job) or at most one (prune and evaluate: one
    pass over the test set). Memory and run time are the profile's (default-resources, set-resources); the
    deprecated config keys `mem_mb` and `runtime` (minutes per stage) still set them where given."""
    gpus = config["gpus"]
    out = {"gpu": min(gpus, 1) if one_pass else gpus}
    if config.get("mem_mb") is not None:
        out["mem_mb"] = config["mem_mb"]
    minutes = (config.get("runtime") or {}).get(stage)
    if minutes is not None:
        out["runtime"] = minutes
    return out


def threads(one_pass=False):
    """Threads of a job: 1 (the embedded default runs tiny jobs side by side), or the deprecated config key
    `threads` (half for prune / evaluate); a profile's set-threads overrides both."""
    given = config.get("threads")
    if given is None:
        return 1
    return max(1, given // 2) if one_pass else given


def template_only(wildcards):
    raise ValueError("stage_job is the template of the stage jobs, not a job; ask for an output file or another rule")


def input_flags(wildcards, input):
    """Params function: each named input as the CLI flag of that name (checkpoint -> --checkpoint, scheme -> --scheme,
    budget -> --budget, import_checkpoint -> --import-checkpoint), in the rule's order."""
    flags = [f"--{name.replace('_', '-')} {shlex.quote(str(path))}" for name, path in input.items()]
    return " ".join(flags)


def out_dir(wildcards, output):
    """Params function: the folder of a job's outputs (the CLI's --out-dir)."""
    return str(Path(output[0]).parent)


# ---- paths -------------------------------------------------------------------------------------------------------
def pretrain_dir(seed="{seed}"):
    return f"{RUNS}/pretrain/seed-{seed}"


def run_dir(method="{method}", point="{point}", seed="{seed}"):
    """One run of a method at one point: results/<name>/<dataset>/<arch>/<method>/<point>/seed-<seed>."""
    return f"{RUNS}/{method}/{point}/seed-{seed}"


def stage_outputs(stage, directory):
    """Named outputs of a stage in `directory` (file names from bsq.layout)."""
    return {name: f"{directory}/{FILE_NAMES[name]}" for name in OUTPUTS[stage]}


def job_log(rule, pattern):
    return f"{LOGS}/{rule}/{pattern}.log"


def job_benchmark(rule, pattern):
    return f"{BENCH}/{rule}/{pattern}.tsv"


def pretrained_input(wildcards):
    """The configured float checkpoint to import instead of training (the CLI's --import-checkpoint), if any."""
    return {"import_checkpoint": config["pretrained"]} if config["pretrained"] else {}


def float_checkpoint(wildcards):
    return f"{pretrain_dir(wildcards.seed)}/{FILE_NAMES['checkpoint']}"


def initial_bits():
    """Starting precision of the search (stages.search.quant.nbits; the paper's 8)."""
    return config.get("stages", {}).get("search", {}).get("quant", {}).get("nbits", 8)


def evaluated_checkpoint(wildcards):
    """The model an evaluate job measures: `<run>/<variant>/model.pt` (BSQ finetune or scratch, the one-run FracBits
    and uniform QAT jobs write theirs to `finetune/` too)."""
    return f"{run_dir(wildcards.method, wildcards.point, wildcards.seed)}/{wildcards.variant}/{FILE_NAMES['checkpoint']}"


def budgeted_inputs(method):
    """Input function: the float model, plus the budget (the matched BSQ run's prune metrics) when the point sits at
    a BSQ run's cost (Point.budget_of)."""

    def inputs(wildcards):
        files = {"checkpoint": float_checkpoint(wildcards)}
        matched = point_of(method, wildcards.point).budget_of
        if matched is not None:
            metrics = f"{run_dir(matched.method, matched.slug, wildcards.seed)}/prune/{FILE_NAMES['metrics']}"
            files["budget"] = metrics
        return files

    return inputs


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
    for run in RUN_TABLE:
        for variant in run.variants():
            row = {"eval": f"{run.dir}/eval-{variant}/metrics.json", "train": f"{run.dir}/{variant}/metrics.json"}
            if run.method == "bsq" and variant == "finetune":
                row["prune"] = f"{run.dir}/prune/metrics.json"
            rows.append(row)
    return rows


def scheme_files():
    """Per-layer bits of the first seed for the layer plot: BSQ per alpha (its pruned scheme), and every method run at
    a BSQ run's cost (FracBits, CSQ, MSQ, HAWQ-V3, DNAS: the scheme its one job wrote), so allocations at equal cost
    line up."""
    first = config["seeds"][0]  # curves and per-layer bars show the first seed, as the paper's figures
    return {
        f"{run.method}/{run.point.slug}": f"{run.dir}/{'prune' if run.method == 'bsq' else 'finetune'}/scheme.json"
        for run in RUN_TABLE
        if run.seed == first and (run.method == "bsq" or run.point.budget_of is not None)
    }


def search_histories():
    """alpha label -> the first seed's BSQ search history (the search-curve plot)."""
    first = config["seeds"][0]
    return {run.point.labels["alpha"]: f"{run.dir}/search/history.csv" for run in runs_of("bsq") if run.seed == first}


def aggregate_inputs(wildcards):
    files = {f"{kind}_{i}": path for i, row in enumerate(evaluations()) for kind, path in row.items()}
    files.update({f"history_{alpha}": path for alpha, path in search_histories().items()})
    files.update({f"scheme_{i}": path for i, path in enumerate(scheme_files().values())})
    files["baselines"] = config["baselines"]
    return files


def all_targets():
    """Tables, plots, the model card and every trained model's metrics: a deleted training output is a missing target,
    so `snakemake` redoes that branch (the job, its evaluation, the tables) and nothing else."""
    trained = [row["train"] for row in evaluations()]
    return [*TABLES.values(), *PLOTS.values(), f"results/models/{config['arch']}/summary.json", *trained]


check_inputs()
