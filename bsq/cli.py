"""The `bsq` command line: what the Snakemake rules call. `bsq --help` lists the subcommands.

bsq models                                        # the registry
bsq inspect --arch resnet20 --nbits 8 --out-dir results/models/resnet20
bsq inspect --arch resnet20 --checkpoint model_best.pth.tar --out-dir out/   # an official checkpoint
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from bsq.errors import BSQError


def _inspect(args: argparse.Namespace) -> None:
    """Convert a model (fresh, or from a checkpoint) to bit planes and write its per-layer table and costs."""
    from bsq.metrics import layer_table, model_bitops_g, summary
    from bsq.models import create_model, model_info
    from bsq.official import load_official_state, read_official_checkpoint
    from bsq.quant.convert import QuantPolicy, quantize_model
    from bsq.regularizers import bit_penalty

    info = model_info(args.arch)
    num_classes = args.num_classes or (10 if info.family == "cifar" else 1000)
    model = create_model(args.arch, num_classes=num_classes, act_bits=args.act_bits)
    if args.checkpoint:
        load_official_state(model, read_official_checkpoint(args.checkpoint))
    policy = QuantPolicy(nbits=args.nbits, quantize_shortcuts=args.quantize_shortcuts)
    model = quantize_model(model, policy)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = layer_table(model)
    table.to_csv(out / "layers.csv", index=False)
    result = {
        "arch": args.arch,
        "nbits": args.nbits,
        "act_bits": args.act_bits,
        "checkpoint": args.checkpoint,
        **summary(model),
        "bitops_g": model_bitops_g(model, info.input_size),
        "penalty_r_over_tp": bit_penalty(model).item(),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


def _models(args: argparse.Namespace) -> None:
    from bsq.models import list_models

    print("\n".join(list_models()))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bsq", description="BSQ reproduction suite")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered architectures").set_defaults(func=_models)
    p = sub.add_parser("inspect", help="per-layer bits, compression, size and BitOPs of a bit-plane model")
    p.add_argument("--arch", required=True, help="a name from `bsq models`")
    p.add_argument("--nbits", type=int, default=8, help="initial precision of every quantized layer (BSQ: 8)")
    p.add_argument("--act-bits", type=int, default=4, help="activation bits (BSQ README: 4)")
    p.add_argument("--num-classes", type=int, default=None, help="default: 10 for CIFAR models, 1000 for ImageNet")
    p.add_argument("--checkpoint", default=None, help="official float or bit-form checkpoint to load first")
    p.add_argument("--quantize-shortcuts", action="store_true", help="paper-era policy (spec P4)")
    p.add_argument("--out-dir", required=True, help="writes layers.csv and summary.json here")
    p.set_defaults(func=_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except BSQError as exc:
        print(f"bsq: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
