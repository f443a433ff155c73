"""What each method's training costs, as ratios to full precision measured in one run: trainable parameters,
optimizer-state bytes, peak memory and step time (issue 18's training-cost table; MSQ's claims are checked here).

Run:  .venv/bin/python benchmarks/train_cost.py                                   # ResNet-20, batch 128, CIFAR shape
      .venv/bin/python benchmarks/train_cost.py --arch resnet50 --batch 32 --steps 3 --warmup 1   # ImageNet shape
      add --device cuda on a GPU; --modes fp bsq csq msq ... to pick methods.

Each mode is one method's training step as its stage runs it, on synthetic data of the dataset's shape (the step's
cost does not depend on the pixels): the model its search trains (BSQ's 8-bit planes, CSQ's gated planes, MSQ's float
weights with LSB quantizers, FracBits' fractional bits, a DNAS super-network, HAWQ-V3's per-layer QAT model), its
loss with the method's penalty, backward, the SGD step (momentum: one state tensor per trainable parameter) and the
method's per-step projection. HAWQ-V3's one-off Hessian traces are timed apart (`oneoff_s`: its sensitivity pass
over one batch). Every mode runs in its own process, so peak memory is its own (max RSS minus the RSS after imports
on CPU; max allocated on CUDA); modes alternate `--repeats` times so load drift hits all alike. One JSON line per
mode goes to results/benchmarks.jsonl, with the ratios to FP of the same run.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from _common import append_result, environment

SHAPES = {"cifar": (3, 32, 32), "imagenet": (3, 224, 224)}
HESSIAN_SAMPLES = 32  # --hessian-samples: Hutchinson samples of HAWQ-V3's one-off pass (set in main)


@dataclass
class Trainee:
    """One method's training step: the model, its extra loss (added to CE), and what runs after backward / step."""

    model: torch.nn.Module
    penalty: Callable[[torch.nn.Module], torch.Tensor | None] | None = None
    after_backward: Callable[[torch.nn.Module], None] | None = None
    after_step: Callable[[torch.nn.Module], None] | None = None
    oneoff: Callable[[torch.Tensor, torch.Tensor], None] | None = None  # once before training (HAWQ's traces)
    notes: dict = field(default_factory=dict)


def _fp(arch: str, shape, classes: int) -> Trainee:
    from bsq.models import create_model

    return Trainee(create_model(arch, classes, act_bits=4))


def _bsq(arch: str, shape, classes: int) -> Trainee:
    from bsq.models import create_model
    from bsq.quant.convert import clamp_bits_, quantize_model
    from bsq.regularizers import add_penalty_grad_

    model = quantize_model(create_model(arch, classes, act_bits=4))  # 8-bit planes, as BSQ's search starts
    return Trainee(model, after_backward=lambda m: add_penalty_grad_(m, alpha=0.01), after_step=clamp_bits_)


def _fracbits(arch: str, shape, classes: int) -> Trainee:
    from bsq.methods.fracbits.cost import CostModel, penalty
    from bsq.models import create_model
    from bsq.quant.frac import FracPolicy, clamp_frac_bits_, frac_quantize_model, mark_signed_inputs_

    model = frac_quantize_model(create_model(arch, classes, act_bits=None), FracPolicy(init_bits=3.5))
    mark_signed_inputs_(model, shape)
    size = CostModel(model, shape, "size")
    target = size().item() * 0.8
    return Trainee(model, penalty=lambda m: penalty(size(), target, 1.0, True), after_step=clamp_frac_bits_)


def _csq(arch: str, shape, classes: int) -> Trainee:
    from bsq.methods.csq.budget import budget_penalty
    from bsq.methods.csq.layers import csq_quantize_model, set_state_
    from bsq.models import create_model
    from bsq.quant.convert import QuantPolicy

    # 8 real-valued planes per sign and weight, one gate per bit position, soft gates (the search phase)
    model = csq_quantize_model(create_model(arch, classes, act_bits=4), QuantPolicy(nbits=8))
    set_state_(model, beta=2.0, hard_gates=False)
    return Trainee(model, penalty=lambda m: budget_penalty(m, 0.01, 2.0, "gates")[0])


def _msq(arch: str, shape, classes: int) -> Trainee:
    from bsq.methods.msq.config import MSQConfig
    from bsq.methods.msq.layers import MSQPolicy, msq_quantize_model, training_footprint
    from bsq.methods.msq.train import penalty
    from bsq.models import create_model

    # float weights with 8-bit round-clamp quantizers and the LSB penalty; the Hessian pass of a pruning step (every
    # msq.prune_interval epochs) is not in the step
    model = msq_quantize_model(create_model(arch, classes, act_bits=4), MSQPolicy(nbits=8))
    cfg = MSQConfig()
    return Trainee(model, penalty=lambda m: penalty(m, cfg), notes={"footprint": training_footprint(model)})


def _hawq(arch: str, shape, classes: int) -> Trainee:
    """HAWQ-V3's training is QAT at fixed per-layer bits (here 4/8 alternating); its one-off cost is the Hessian
    traces of the float model (its sensitivity pass), timed on one batch with --hessian-samples Hutchinson samples."""
    from bsq.models import create_model
    from bsq.quant.frac import FracPolicy, frac_layers, frac_quantize_model, mark_signed_inputs_
    from bsq.quant.hessian import hutchinson_traces

    floats = create_model(arch, classes, act_bits=None)
    convs = {n: m.weight for n, m in floats.named_modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))}

    def traces(x: torch.Tensor, y: torch.Tensor) -> None:
        floats.to(x.device).eval()
        samples = HESSIAN_SAMPLES
        loss = lambda b: F.cross_entropy(floats(b[0]), b[1])  # noqa: E731
        hutchinson_traces(loss, [(x, y)], convs, max_samples=samples, min_samples=min(8, samples))

    model = frac_quantize_model(create_model(arch, classes, act_bits=None), FracPolicy(w_bits=(4, 8), hard=True))
    mark_signed_inputs_(model, shape)
    with torch.no_grad():
        for i, (_, layer) in enumerate(frac_layers(model)):
            if layer.searches_weight:
                layer.wbits.fill_(4.0 if i % 2 else 8.0)
    return Trainee(model, oneoff=traces)


def _dnas(arch: str, shape, classes: int) -> Trainee:
    from bsq.methods.dnas.cost import ExpectedCost, complexity_term
    from bsq.methods.dnas.supernet import to_supernet_
    from bsq.models import create_model
    from bsq.quant.frac import FracPolicy, frac_quantize_model, mark_signed_inputs_

    # EdMIPS' efficient form: candidates {1, 2, 3, 4} mixed before one conv; theta trained jointly (same optimizer)
    model = frac_quantize_model(create_model(arch, classes, act_bits=None), FracPolicy(w_bits=(1, 4), hard=True))
    mark_signed_inputs_(model, shape)
    model = to_supernet_(model, [1, 2, 3, 4])
    cost = ExpectedCost(model, shape, "size")
    target = cost().item() * 0.8
    return Trainee(model, penalty=lambda m: complexity_term(cost(), "target", 1.0, target, 1.0))


BUILDERS: dict[str, Callable[..., Trainee]] = {
    "fp": _fp,
    "bsq": _bsq,
    "csq": _csq,
    "msq": _msq,
    "fracbits": _fracbits,
    "hawq": _hawq,
    "dnas": _dnas,
}


def _optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(args: argparse.Namespace, mode: str) -> dict:
    from bsq.models import model_info

    torch.manual_seed(0)
    device = torch.device(args.device)
    family = model_info(args.arch).family
    shape, classes = SHAPES[family], (10 if family == "cifar" else 1000)
    base_mib = _rss_mib()
    x = torch.randn(args.batch, *shape, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)
    trainee = BUILDERS[mode](args.arch, shape, classes)
    model = trainee.model.to(device).train()
    oneoff_s = None
    if trainee.oneoff is not None:
        t0 = time.perf_counter()
        trainee.oneoff(x, y)
        oneoff_s = time.perf_counter() - t0
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        extra = trainee.penalty(model) if trainee.penalty is not None else None
        if extra is not None:
            loss = loss + extra
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if trainee.after_backward is not None:
            trainee.after_backward(model)
        opt.step()
        if trainee.after_step is not None:
            trainee.after_step(model)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_mib() - base_mib
    return {
        "mode": mode,
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_state_bytes": _optimizer_state_bytes(opt),
        "peak_mem_mib": round(peak, 1),
        "median_step_s": statistics.median(times),
        "oneoff_s": None if oneoff_s is None else round(oneoff_s, 3),
        **trainee.notes,
    }


def _rows(runs: dict[str, list[dict]]) -> dict[str, dict]:
    rows = {}
    for mode, results in runs.items():
        first = results[0]
        rows[mode] = {
            **{k: v for k, v in first.items() if k not in ("median_step_s", "peak_mem_mib")},
            "median_step_s": round(statistics.median(r["median_step_s"] for r in results), 5),
            "per_process_median_step_s": [round(r["median_step_s"], 5) for r in results],
            "peak_mem_mib": max(r["peak_mem_mib"] for r in results),
        }
    fp = runs.get("fp")
    for mode, row in rows.items():
        if fp is None:
            continue
        ratios = [m["median_step_s"] / f["median_step_s"] for f, m in zip(fp, runs[mode], strict=True)]
        row["step_over_fp"] = round(statistics.median(ratios), 3)  # per-round ratio: robust to drift
        for key in ("trainable_params", "optimizer_state_bytes", "peak_mem_mib"):
            row[f"{key}_over_fp"] = round(row[key] / rows["fp"][key], 3) if rows["fp"][key] else None
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--modes", nargs="+", default=list(BUILDERS), choices=list(BUILDERS))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="alternating process rounds (drift-robust)")
    parser.add_argument("--hessian-samples", type=int, default=32, help="HAWQ-V3's one-off Hutchinson samples")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to results/")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    global HESSIAN_SAMPLES
    HESSIAN_SAMPLES = args.hessian_samples
    if args.only:
        print(json.dumps(measure(args, args.only)))
        return
    modes = ["fp", *[m for m in args.modes if m != "fp"]]  # FP always: the ratios' denominator
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    child = [a for a in sys.argv[1:] if a != "--no-append"]
    for _ in range(args.repeats):
        for mode in modes:
            cmd = [sys.executable, __file__, *child, "--only", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(out))
    settings = {
        "benchmark": "train_cost",
        "arch": args.arch,
        "batch": args.batch,
        "steps": args.steps,
        "hessian_samples": args.hessian_samples,
    }
    env = environment(args.device)
    for row in _rows(runs).values():
        line = {**settings, **row, **env}
        print(json.dumps(line))
        if not args.no_append:
            append_result(line)


if __name__ == "__main__":
    main()
