"""Wall time of one training epoch per stage (pretrain / BSQ search / finetune) through the real stage code.

Run:  .venv/bin/python benchmarks/epoch_time.py --data-root DIR [--arch resnet20] [--device cuda] [--train-subset N]
      (no --data-root: CIFAR-shaped random uint8 data, 50,000 / 10,000 images, same code path)

Each stage runs 1 epoch (search: the BSQ regulariser, clamp and an end-of-epoch projection; finetune: the pruned
scheme) with tracking off; the figure is the engine's `train_seconds` (training only) and `eval_seconds`.
Prints one JSON line (device, versions, figures) and appends it to results/benchmarks.jsonl.
"""

from __future__ import annotations

import argparse
import json
import pickle
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import append_result, environment


def synthetic_cifar(folder: Path) -> Path:
    """A cifar-10-batches-py folder of random images: the loader and model do the same work as on the real set."""
    batches = folder / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in [(f"data_batch_{i}", 10_000) for i in range(1, 6)] + [("test_batch", 10_000)]:
        data = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        with open(batches / name, "wb") as fh:
            pickle.dump({"data": data, "labels": rng.integers(0, 10, n).tolist()}, fh)
    return folder


def run(args: argparse.Namespace, data_root: str) -> dict:
    from bsq.layout import default_outputs
    from bsq.methods.bsq import finetune, prune, search
    from bsq.stages import pretrain

    base = {
        "device": args.device,
        "data": {"name": "cifar10", "root": data_root, "train_subset": args.train_subset, "workers": args.workers},
        "model": {"arch": args.arch, "act_bits": 4},
        "tracking": {"enabled": False},
        "progress": False,
    }
    if args.on_device is not None:
        base["data"]["on_device"] = args.on_device
    base["speed"] = {"channels_last": args.channels_last, "amp": args.amp, "compile": args.compile}
    figures = {}
    with tempfile.TemporaryDirectory() as tmp:
        out = {s: default_outputs(s, Path(tmp) / s) for s in ("pretrain", "search", "prune", "finetune")}
        plan = [
            ("pretrain", pretrain, {}, {}),
            ("search", search, {"bsq": {"alpha": "5e-3"}}, {"checkpoint": out["pretrain"]["checkpoint"]}),
            ("prune", prune, {}, {"checkpoint": out["search"]["checkpoint"]}),
            ("finetune", finetune, {}, {"checkpoint": out["prune"]["checkpoint"]}),
        ]
        for stage, module, extra, inputs in plan:
            config = {**base, **extra, "optim": {"epochs": 0 if stage == "prune" else 1}}
            started = time.perf_counter()
            module.run(config, inputs, out[stage])
            wall = time.perf_counter() - started
            if stage == "prune":
                continue
            history = (Path(tmp) / stage / "history.csv").read_text().splitlines()
            header, row = history[0].split(","), history[1].split(",")
            record = dict(zip(header, row, strict=True))
            figures[f"{stage}_train_s"] = round(float(record["train_seconds"]), 2)
            figures[f"{stage}_eval_s"] = round(float(record["eval_seconds"]), 2)
            figures[f"{stage}_wall_s"] = round(wall, 2)
    figures["search_over_pretrain"] = round(figures["search_train_s"] / figures["pretrain_train_s"], 3)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", help="folder with cifar-10-batches-py (default: synthetic data)")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (default: all)")
    parser.add_argument("--workers", type=int, default=0)
    parser.add_argument("--on-device", type=lambda v: v.lower() == "true", default=None, help="data.on_device")
    parser.add_argument("--channels-last", type=lambda v: v.lower() == "true", default=None, help="speed.channels_last")
    parser.add_argument("--amp", choices=["bf16"], help="speed.amp")
    parser.add_argument("--compile", action="store_true", help="speed.compile")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to results/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data_root = args.data_root or str(synthetic_cifar(Path(tmp)))
        figures = run(args, data_root)
    line = {
        "benchmark": "epoch_time",
        "arch": args.arch,
        "data": "cifar10" if args.data_root else "synthetic-cifar10",
        "train_subset": args.train_subset,
        "on_device": args.on_device,
        "channels_last": args.channels_last,
        "amp": args.amp,
        "compile": args.compile,
        **environment(args.device),
        **figures,
    }
    print(json.dumps(line))
    if not args.no_append:
        append_result(line)


if __name__ == "__main__":
    main()
