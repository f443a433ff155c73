"""The `bsq` command line: what the Snakemake rules call. `bsq --help` lists the subcommands.

bsq models                                        # the architectures
bsq methods                                       # the methods and their stages
bsq inspect --arch resnet20 --nbits 8 --out-dir results/models/resnet20
bsq pretrain --config stage.yaml --out-dir runs/pretrain                      # or --import-checkpoint PATH
bsq search   --config stage.yaml --checkpoint runs/pretrain/model.pt --alpha 5e-3 --out-dir runs/a5e-3/search
bsq prune    --config stage.yaml --checkpoint runs/a5e-3/search/model.pt --out-dir runs/a5e-3/prune
bsq finetune --config stage.yaml --checkpoint runs/a5e-3/prune/model.pt --out-dir runs/a5e-3/finetune
bsq evaluate --checkpoint model_best.pth.tar --arch resnet20 --data cifar10 --data-root DIR \
             --weight-bits 8 --act-bits 4 --out-dir runs/official             # an official checkpoint
bsq fracbits --checkpoint runs/pretrain/model.pt --budget runs/a5e-3/prune/metrics.json --out-dir runs/fb-a5e-3
bsq fracbits --checkpoint runs/pretrain/model.pt --target 0.08 --out-dir runs/fb-0.08mb  # --set fracbits.cost=bitops
bsq uniform  --checkpoint runs/pretrain/model.pt --bits 4 --out-dir runs/uniform-w4
bsq trace    --checkpoint model_best.pth.tar --data-root DIR --preset official-bin --out trace.json   # vs the authors

Stage options: `--config FILE` (YAML/JSON stage config, see bsq.config), `--set key.sub=value` (YAML value),
shortcuts for common keys, `--input name=PATH`, and `--out-dir DIR` or `--output name=PATH` for every output.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from bsq.errors import BSQError, StageInterrupted
from bsq.signals import stop_signals_raise


def _inspect(args: argparse.Namespace) -> None:
    """Convert a model (fresh, or from a checkpoint) to bit planes and write its per-layer table and costs."""
    from bsq.atomic import write_text_atomic
    from bsq.metrics import layer_table, model_bitops_g, summary
    from bsq.models import create_model, model_info
    from bsq.official import official_model
    from bsq.quant.convert import QuantPolicy, bit_layers, quantize_model
    from bsq.regularizers import bit_penalty

    info = model_info(args.arch)
    num_classes = args.num_classes or (10 if info.family == "cifar" else 1000)
    policy = QuantPolicy(nbits=args.nbits, quantize_shortcuts=args.quantize_shortcuts)
    if args.checkpoint:  # the authors' float file, or their bit form (kept at its own precisions)
        model_args = {"arch": args.arch, "num_classes": num_classes, "act_bits": args.act_bits}
        model = official_model(model_args, args.checkpoint, policy, who="bsq inspect")
    else:
        model = create_model(args.arch, num_classes=num_classes, act_bits=args.act_bits)
    if not any(True for _ in bit_layers(model)):
        model = quantize_model(model, policy)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = layer_table(model, info.input_size)
    write_text_atomic(out / "layers.csv", table.to_csv(index=False))
    result = {
        "arch": args.arch,
        "nbits": args.nbits,
        "act_bits": args.act_bits,
        "checkpoint": args.checkpoint,
        **summary(model),
        "bitops_g": model_bitops_g(model, info.input_size),
        "penalty_r_over_tp": bit_penalty(model).item(),
    }
    write_text_atomic(out / "summary.json", json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _methods(args: argparse.Namespace) -> None:
    from bsq.methods import registry

    for method in registry().values():
        stages = " -> ".join(spec.name for spec in method.stages)
        print(f"{method.name:10s} {stages:28s} {method.summary}")


def _models(args: argparse.Namespace) -> None:
    from bsq.models import list_models

    print("\n".join(list_models()))


# shortcut flag -> dotted config key (each stage's own flags come from its StageSpec)
SHORTCUTS = {
    "arch": "model.arch",
    "act_bits": "model.act_bits",
    "data": "data.name",
    "data_root": "data.root",
    "epochs": "optim.epochs",
    "lr": "optim.lr",
    "seed": "seed",
    "preset": "preset",
    "device": "device",
    "tracking_uri": "tracking.uri",
    "experiment": "tracking.experiment",
}


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BSQError(f"{flag} expects NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def _set_dotted(config: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    node = config
    for key in parents:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise BSQError(f"--set {dotted}: {key} is not a section")
    node[leaf] = value


def stage_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The stage config: --config file, then --set overrides, then shortcut flags (last wins)."""
    import yaml

    config: dict[str, Any] = {}
    if args.config_json:
        config = json.loads(args.config_json)
        if not isinstance(config, dict):
            raise BSQError("--config-json must be a JSON object of config keys")
    elif args.config:
        path = Path(args.config)
        try:
            with open(path) as handle:  # a file, not its text: YAML's error then names the file with the line
                config = yaml.safe_load(handle) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise BSQError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(config, dict):
            raise BSQError(f"{path} must hold a mapping of config keys")
    for key, text in _pairs(args.set, "--set").items():
        _set_dotted(config, key, yaml.safe_load(text) if text else None)
    for flag, dotted in {**SHORTCUTS, **getattr(args, "config_flags", {})}.items():
        value = getattr(args, flag, None)
        if value is not None:
            _set_dotted(config, dotted, None if value == "none" else value)
    if getattr(args, "no_tracking", False):
        _set_dotted(config, "tracking.enabled", False)
    return config


def adopt_checkpoint_settings(config: dict[str, Any], checkpoint: str | None) -> None:
    """Model and dataset settings the user left out are taken from our upstream checkpoint, so that
    `bsq prune --checkpoint search/model.pt` needs no repeated --arch/--data; explicit settings always win
    (and a mismatch with the checkpoint is then reported by the stage)."""
    if not checkpoint or not Path(checkpoint).is_file():
        return  # the stage reports a missing input with its own message
    from bsq.checkpoint import load_checkpoint

    try:
        ckpt = load_checkpoint(checkpoint)
    except BSQError:
        return  # not one of ours (e.g. the authors' file): the stage explains what it needs
    model, labels = ckpt.get("model", {}), ckpt.get("labels", {})
    section = config.setdefault("model", {})
    for key in ("arch", "width"):  # act_bits stay the config's: the search may quantize a float-activation model
        if key not in section and key in model:
            section[key] = model[key]
    if "dataset" in labels and "name" not in config.setdefault("data", {}):
        config["data"]["name"] = labels["dataset"]


def _run_stage(args: argparse.Namespace) -> None:
    from bsq.layout import default_outputs
    from bsq.methods import stage_spec

    spec = stage_spec(args.command)
    config = stage_config_from_args(args)
    inputs = _pairs(args.input, "--input")
    if args.checkpoint:
        inputs["checkpoint"] = args.checkpoint
    if args.command != "pretrain":
        adopt_checkpoint_settings(config, inputs.get("checkpoint"))
    extra: dict[str, Any] = {}
    for flag in spec.flags:
        value = getattr(args, _dest(flag))
        if flag.input and value:
            inputs[flag.input] = value
        elif flag.arg:
            extra[flag.arg] = value
    outputs: dict[str, Any] = dict(default_outputs(args.command, args.out_dir)) if args.out_dir else {}
    outputs.update(_pairs(args.output, "--output"))
    metrics = spec.run_function()(config, inputs, outputs, **extra)
    if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0's metrics are the job's
        print(json.dumps(metrics, default=str))


def _dest(flag) -> str:
    return flag.name.lstrip("-").replace("-", "_")


def _trace(args: argparse.Namespace) -> None:
    """K search steps from a float checkpoint, printed (and written to --out) as one JSON object in the format
    of the authors' reference trajectories (bsq.trace)."""
    from bsq.config import load_stage_config
    from bsq.trace import run_trace

    config = stage_config_from_args(args)
    config.setdefault("optim", {}).setdefault("epochs", 1)  # the search's config; trace counts steps, not epochs
    _set_dotted(config, "tracking.enabled", False)
    cfg = load_stage_config("search", config)
    record = run_trace(cfg, args.checkpoint, args.steps, args.alpha, args.lr if args.lr is not None else cfg.optim.lr)
    text = json.dumps(record, indent=1)
    if args.out:
        from bsq.atomic import write_text_atomic

        write_text_atomic(Path(args.out), text + "\n")
    print(text)


def _add_trace(sub) -> None:
    from bsq.presets import PRESET_NAMES

    p = sub.add_parser("trace", help="K BSQ search steps from a float checkpoint, as the authors' reference runs")
    p.add_argument("--checkpoint", required=True, help="float checkpoint (the authors' model_best.pth.tar)")
    p.add_argument("--arch", default="resnet20", help="model.arch (default resnet20)")
    p.add_argument("--data", default="cifar10", help="data.name: cifar10 (default) or digits")
    p.add_argument("--data-root", help="data.root: the folder holding cifar-10-batches-py")
    p.add_argument("--steps", type=int, default=20, help="search steps (default 20)")
    p.add_argument("--alpha", type=float, default=5.0, help="the authors' --decay: loss = CE + alpha R / TP")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default: the search recipe's 0.1)")
    p.add_argument("--preset", help=f"fidelity preset: {', '.join(PRESET_NAMES)} (default: default)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. bsq.clamp=none")
    p.add_argument("--config", help="YAML/JSON stage config (search keys: see bsq.config.StageConfig)")
    p.add_argument("--seed", type=int, help="seed")
    p.add_argument("--out", help="also write the JSON object to this file")
    p.set_defaults(func=_trace, config_json=None, device="cpu")


def _add_stage(sub, spec) -> None:
    """A subcommand for one stage (bsq.methods.StageSpec): the shared options, then the stage's own flags."""
    p = sub.add_parser(spec.name, help=spec.help)
    p.add_argument("--config", help="YAML/JSON stage config (keys: see bsq.config.StageConfig)")
    p.add_argument("--config-json", help="the whole stage config as one JSON object (used by the workflow)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. optim.lr=0.05")
    p.add_argument("--input", action="append", default=[], metavar="NAME=PATH", help="stage input by name")
    p.add_argument("--output", action="append", default=[], metavar="NAME=PATH", help="stage output by name")
    p.add_argument("--out-dir", help="write every output under DIR with its standard file name")
    p.add_argument("--checkpoint", help="the input checkpoint (same as --input checkpoint=PATH)")
    p.add_argument("--arch", help="model.arch")
    # "none" stays a word here: None would read as "flag not given" and leave the config's act_bits in place
    p.add_argument("--act-bits", type=lambda v: "none" if v == "none" else int(v), help="model.act_bits (none = ReLU)")
    p.add_argument("--data", help="data.name (digits, cifar10, imagenet)")
    p.add_argument("--data-root", help="data.root")
    p.add_argument("--epochs", type=int, help="optim.epochs")
    p.add_argument("--lr", type=float, help="optim.lr")
    p.add_argument("--seed", type=int, help="seed")
    p.add_argument("--preset", help="fidelity preset: default, official-bin, official, paper-era (bsq.presets)")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: local SQLite under results/mlflow)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    config_flags = {}
    for flag in spec.flags:
        if flag.type is bool:
            p.add_argument(flag.name, action="store_true", help=flag.help)
        else:
            p.add_argument(flag.name, type=flag.type, help=flag.help)
        if flag.key:
            config_flags[_dest(flag)] = flag.key
    p.set_defaults(func=_run_stage, config_flags=config_flags)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsq", description="BSQ reproduction suite")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered architectures").set_defaults(func=_models)
    sub.add_parser("methods", help="list the registered methods and their stages").set_defaults(func=_methods)
    p = sub.add_parser("inspect", help="per-layer bits, compression, size and BitOPs of a bit-plane model")
    p.add_argument("--arch", required=True, help="a name from `bsq models`")
    p.add_argument("--nbits", type=int, default=8, help="initial precision of every quantized layer (BSQ: 8)")
    p.add_argument(
        "--act-bits",
        type=lambda v: None if v == "none" else int(v),
        default=4,
        help="activation bits (BSQ README: 4; none = ReLU)",
    )
    p.add_argument("--num-classes", type=int, default=None, help="default: 10 for CIFAR models, 1000 for ImageNet")
    p.add_argument("--checkpoint", default=None, help="official float or bit-form checkpoint to load first")
    p.add_argument("--quantize-shortcuts", action="store_true", help="paper-era policy (spec P4)")
    p.add_argument("--out-dir", required=True, help="writes layers.csv and summary.json here")
    p.set_defaults(func=_inspect)
    from bsq.methods import all_stages

    for spec in all_stages().values():  # the generic stages, then each registered method's
        _add_stage(sub, spec)
    _add_trace(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    try:
        with stop_signals_raise():  # SIGTERM / SIGHUP end the job as Ctrl-C does (bsq.signals)
            args.func(args)
    except BSQError as exc:
        print(f"bsq: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        why = str(exc) if isinstance(exc, StageInterrupted) else "interrupted"
        print(f"bsq: {why}; run the same command again to resume from the last completed epoch", file=sys.stderr)
        return 128 + (exc.signum if isinstance(exc, StageInterrupted) else signal.SIGINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
