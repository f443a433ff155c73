"""The run context of one stage job: everything fixed before it does anything, validated first.

`open_context` reads the stage config, checks the input files and output names against the stage's spec (a
method's from the registry, or a generic stage's), and only then does anything with side effects (the device and
process group, the tracking store check, the seed). The `RunContext` it returns is frozen: stages read it and never
write to it; what a job produces goes through `bsq.stages.lineage`, `bsq.stages.artifacts` and the skeleton.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch

from bsq.checkpoint import Form, load_checkpoint
from bsq.config import StageConfig, config_to_dict, load_stage_config
from bsq.data import DatasetInfo, Loaders, build_loaders, dataset_info
from bsq.engine import Distributed, init_seed, seed_all
from bsq.errors import BSQError
from bsq.methods import StageSpec, method_of_stage, stage_spec
from bsq.stages.resume import ResumeFile
from bsq.tracking import check_tracking_uri, config_hash, default_tracking_uri, flatten

__all__ = ["RunContext", "open_context", "VOLATILE", "stage_keys", "scoped_params"]

# Keys that do not change the result: excluded from the config hash (a resumed job may move device or store)
# and logged as tags instead of params.
VOLATILE = ("device", "progress", "tracking", "data.root", "data.workers", "data.pin_memory", "data.download")
ANY_PARENT = (Form.FLOAT, Form.BITS, Form.LATENT)
# A run's MLflow params are the settings its stage reads (sections or dotted keys): the shared ones, then the
# stage's own, as its StageSpec declares them (`reads`; None = all of its method's sections, bsq.methods).
SHARED_KEYS = ("stage", "preset", "seed", "data", "model", "optim", "speed")


@dataclass(frozen=True)
class RunContext:
    """One stage job as configured: its resolved config, checked inputs and outputs, devices and config hash."""

    stage: str
    cfg: StageConfig
    inputs: Mapping[str, Path]
    outputs: Mapping[str, Path]
    folder: Path  # where the outputs go: the lock and the resume file live here
    dist: Distributed
    device: torch.device
    progress: bool
    params: Mapping[str, Any]  # the flattened config that defines the result (MLflow params, the hash)
    volatile: Mapping[str, Any]  # the flattened keys that do not (device, tracking, data paths): MLflow tags
    config_hash: str
    tracking_uri: str

    @property
    def resume_file(self) -> ResumeFile:
        return ResumeFile(self.folder / f".{self.stage}.resume.pt", self.config_hash, self.dist)

    @property
    def stage_params(self) -> dict[str, Any]:
        """The params this stage reads (its StageSpec `reads`): what its MLflow run logs, no other method's."""
        return scoped_params(self.stage, self.params)

    # ---- data ----------------------------------------------------------------------------------------------
    def loaders(self) -> Loaders:
        return build_loaders(self.cfg.data, self.cfg.seed, self.device, self.dist.rank, self.dist.world_size)

    def dataset(self) -> DatasetInfo:
        return dataset_info(self.cfg.data.name)

    # ---- models --------------------------------------------------------------------------------------------
    def activation_overrides(self) -> dict[str, Any]:
        """The config's activation quantization, replacing a parent's (a float model searched at 4-bit inputs)."""
        return {"act_bits": self.cfg.model.act_bits, "stem_act_bits": self.cfg.model.stem_act_bits}

    def bit_policy(self) -> dict[str, Any]:
        """The `quant` policy a float parent is converted to bit planes with, as checkpoints record it."""
        q = self.cfg.quant
        return {
            "quantize_first": q.quantize_first,
            "quantize_last": q.quantize_last,
            "quantize_shortcuts": q.quantize_shortcuts,
        }

    def check_parent(self, parent: Mapping[str, Any], key: str = "checkpoint") -> None:
        """The upstream checkpoint must be for this config's architecture and dataset."""
        info, args = self.dataset(), parent["model"]
        if args["arch"] != self.cfg.model.arch:
            raise BSQError(
                f"{self.inputs[key]} holds a {args['arch']} but model.arch is {self.cfg.model.arch!r}; use the same "
                "architecture in every stage"
            )
        if args["num_classes"] != info.num_classes or args.get("in_channels", 3) != info.in_channels:
            raise BSQError(
                f"{self.inputs[key]} was trained for {args['num_classes']} classes / {args.get('in_channels', 3)} "
                f"channels, but data.name={info.name!r} has {info.num_classes} / {info.in_channels}"
            )

    def read_parent(self, key: str = "checkpoint", forms: tuple[Form, ...] = ANY_PARENT) -> dict[str, Any]:
        """The upstream checkpoint `key`, of one of `forms`, checked against this config."""
        ckpt = load_checkpoint(self.inputs[key])
        if ckpt["form"] not in forms:
            raise BSQError(
                f"{self.inputs[key]} is a {ckpt['form']}-form checkpoint from the {ckpt['stage']} stage; the "
                f"{self.stage} stage needs one of {[str(f) for f in forms]}"
            )
        self.check_parent(ckpt, key)
        return ckpt


def open_context(
    stage: str,
    config: Mapping[str, Any] | StageConfig | None,
    inputs: Mapping[str, Any] | None,
    outputs: Mapping[str, Any] | None,
) -> RunContext:
    """Validate everything that can be checked without side effects (config, input files, output names), so bad
    input fails before any file is written or any MLflow run is created; then pick the device and seed the run."""
    spec = stage_spec(stage)
    if spec is None:
        raise BSQError(f"unknown stage {stage!r}")
    cfg = load_stage_config(stage, config)
    given_inputs = _check_inputs(spec, inputs or {})
    given_outputs = _check_outputs(spec, outputs or {})
    params, volatile = _split_volatile(flatten(config_to_dict(cfg)))
    dist = Distributed.from_env(cfg.device)
    tracking_uri = cfg.tracking.uri or default_tracking_uri(cfg.tracking.results_dir)
    if cfg.tracking.enabled and dist.is_main:
        check_tracking_uri(tracking_uri)  # seconds, not MLflow's minutes of retries per job
    # Everything random before the first epoch (model initialisation, PACT clips, FracBits' probe) draws from
    # the run's seed; each epoch then reseeds from (seed, epoch) in the Trainer.
    seed_all(init_seed(cfg.seed))
    return RunContext(
        stage=stage,
        cfg=cfg,
        inputs=MappingProxyType(given_inputs),
        outputs=MappingProxyType(given_outputs),
        folder=next(iter(given_outputs.values())).parent,
        dist=dist,
        device=dist.device,
        progress=cfg.progress if cfg.progress is not None else sys.stderr.isatty(),
        params=MappingProxyType(params),
        volatile=MappingProxyType(volatile),
        config_hash=config_hash(params),
        tracking_uri=tracking_uri,
    )


def stage_keys(stage: str) -> tuple[str, ...]:
    """The config sections and dotted keys `stage` reads (the shared ones first)."""
    spec, method = stage_spec(stage), method_of_stage(stage)
    if spec is not None and spec.reads is not None:
        return SHARED_KEYS + spec.reads
    return SHARED_KEYS + (tuple(method.sections) if method is not None else ())


def scoped_params(stage: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The flattened `params` under the keys `stage` reads, in `stage_keys` order."""
    keys = stage_keys(stage)
    return {name: value for key in keys for name, value in params.items() if name == key or name.startswith(key + ".")}


def _split_volatile(flat: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    stable, volatile = {}, {}
    for key, value in flat.items():
        target = volatile if any(key == v or key.startswith(v + ".") for v in VOLATILE) else stable
        target[key] = value
    return stable, volatile


def _check_inputs(spec: StageSpec, inputs: Mapping[str, Any]) -> dict[str, Path]:
    required, optional = spec.inputs, spec.optional_inputs
    given = {k: Path(v) for k, v in inputs.items() if v not in (None, "")}
    unknown = sorted(set(given) - set(required) - set(optional))
    if unknown:
        raise BSQError(f"unknown input(s) {unknown} for the {spec.name} stage; it takes {list(required + optional)}")
    missing = [k for k in required if k not in given]
    if missing:
        raise BSQError(f"the {spec.name} stage needs input(s) {missing} (e.g. --input checkpoint=PATH)")
    for key, path in given.items():
        if not path.is_file():
            raise BSQError(f"{spec.name} input {key!r} not found: {path}. Run the upstream stage or fix the path.")
    return given


def _check_outputs(spec: StageSpec, outputs: Mapping[str, Any]) -> dict[str, Path]:
    expected = spec.outputs
    given = {k: Path(v) for k, v in outputs.items()}
    unknown = sorted(set(given) - set(expected))
    missing = [k for k in expected if k not in given]
    if unknown or missing:
        raise BSQError(
            f"the {spec.name} stage writes exactly {list(expected)}; missing {missing}, unknown {unknown}. "
            "Use default_outputs(stage, out_dir) or --out-dir."
        )
    for path in given.values():
        blocking = next((p for p in (path.parent, *path.parent.parents) if p.exists()), None)
        if blocking is not None and not blocking.is_dir():
            raise BSQError(
                f"cannot write {path}: {blocking} is a file, not a folder. Give an output folder (--out-dir) "
                "that does not exist yet or is a directory."
            )
        if path.is_dir():
            raise BSQError(f"cannot write {path}: it is a folder. Remove it or choose another output path.")
    return given
