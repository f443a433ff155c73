"""Median training-step time, steps/s and peak memory of FP vs BSQ (vs FracBits) on synthetic data of a dataset's shape.

Run:  .venv/bin/python benchmarks/step_time.py [--device cuda] [--steps 30]                  # ResNet-20, CIFAR shape
      .venv/bin/python benchmarks/step_time.py --arch resnet50 --batch 64 --steps 20 --modes fp bsq
                                                                              # ResNet-50, ImageNet shape (224 x 224)
      add --channels-last / --amp bf16 (the `speed.*` switches), --modes fp bsq fracbits
FP step       = the float network with BSQ's 4-bit activation quantizers: forward, CE, backward, SGD step.
BSQ step      = the same network in 8-bit bit-plane form: forward, CE, backward, + alpha * d(R/TP) (fused), SGD step,
                [0, 2] clamp (exactly what the search stage does per step).
FracBits step = DoReFa weights and PACT inputs at fractional bits (searched, 4-bit inputs), CE + size penalty.
Each mode runs in its own process so its peak memory (max RSS on CPU, max allocated on CUDA) is its own; modes
alternate `--repeats` times so machine-load drift hits all alike. Prints one JSON line per mode, then one summary
line (ratios to FP), which is also appended to results/benchmarks.jsonl with the device and versions.
Goal (issue 6): BSQ / FP step ratio <= 1.05; the official code measures 1.02 on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from _common import append_result, environment

SHAPES = {"cifar": (3, 32, 32), "imagenet": (3, 224, 224)}


def build(mode: str, arch: str, shape: tuple[int, ...], classes: int):
    from bsq.models import create_model
    from bsq.quant.convert import clamp_bits_, quantize_model
    from bsq.quant.frac import FracPolicy, clamp_frac_bits_, frac_quantize_model, mark_signed_inputs_
    from bsq.regularizers import add_penalty_grad_

    if mode == "fracbits":
        model = frac_quantize_model(create_model(arch, classes, act_bits=None), FracPolicy(init_bits=3.5))
        mark_signed_inputs_(model, shape)
        return model, None, clamp_frac_bits_
    model = create_model(arch, classes, act_bits=4)
    if mode == "fp":
        return model, None, None
    return quantize_model(model), lambda m: add_penalty_grad_(m, alpha=0.01), clamp_bits_


def measure(args: argparse.Namespace, mode: str) -> dict:
    from bsq.engine import Speed
    from bsq.models import model_info

    torch.manual_seed(0)
    device = torch.device(args.device)
    family = model_info(args.arch).family
    shape, classes = SHAPES[family], (10 if family == "cifar" else 1000)
    model, after_backward, after_step = build(mode, args.arch, shape, classes)
    speed = Speed(channels_last=args.channels_last, amp=torch.bfloat16 if args.amp == "bf16" else None)
    model = speed.prepare(model.to(device).train())
    cost = None
    if mode == "fracbits":
        from bsq.methods.fracbits.cost import CostModel, penalty

        size = CostModel(model, shape, "size")
        target = size().item() * 0.8
        cost = lambda: penalty(size(), target, 1.0, True)  # noqa: E731
    # fused=True: one kernel per step for all parameters (BSQ has 16x more of them: 8 planes x 2 signs)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    x = speed.images(torch.randn(args.batch, *shape, device=device))
    y = torch.randint(0, classes, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(args.warmup + args.steps):
        sync()
        t0 = time.perf_counter()
        with speed.autocast(device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            after_backward(model)
        if cost is not None:
            cost().backward()
        opt.step()
        if after_step is not None:
            after_step(model)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        import resource

        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"mode": mode, "median_step_s": statistics.median(times), "peak_mem_mib": round(peak_mib, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet20")
    parser.add_argument("--modes", nargs="+", default=["fp", "bsq"], choices=["fp", "bsq", "fracbits"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="alternating process rounds (drift-robust)")
    parser.add_argument("--channels-last", action="store_true", help="speed.channels_last")
    parser.add_argument("--amp", choices=["bf16"], help="speed.amp")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to results/")
    parser.add_argument("--only", help=argparse.SUPPRESS)  # child-process mode
    args = parser.parse_args()
    if args.only:
        print(json.dumps(measure(args, args.only)))
        return
    runs: dict[str, list[dict]] = {mode: [] for mode in args.modes}
    child = [a for a in sys.argv[1:] if a != "--no-append"]
    for _ in range(args.repeats):
        for mode in args.modes:
            cmd = [sys.executable, __file__, *child, "--only", mode]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            runs[mode].append(json.loads(out))
    settings = {
        "arch": args.arch,
        "batch": args.batch,
        "steps": args.steps,
        "channels_last": args.channels_last,
        "amp": args.amp,
    }
    summary = {"benchmark": "step_time", **settings, **environment(args.device)}
    for mode, results in runs.items():
        step = statistics.median(r["median_step_s"] for r in results)
        row = {
            "mode": mode,
            "median_step_s": round(step, 5),
            "per_process_median_step_s": [round(r["median_step_s"], 5) for r in results],
            "steps_per_s": round(1 / step, 3),
            "peak_mem_mib": max(r["peak_mem_mib"] for r in results),
        }
        print(json.dumps(row | settings))
        summary[f"{mode}_step_s"], summary[f"{mode}_peak_mem_mib"] = row["median_step_s"], row["peak_mem_mib"]
        summary[f"{mode}_steps_per_s"] = row["steps_per_s"]
    if "fp" in runs:
        for mode in runs:
            if mode != "fp":  # median over rounds of the per-round ratio: robust to drift between rounds
                ratios = [m["median_step_s"] / f["median_step_s"] for f, m in zip(runs["fp"], runs[mode], strict=True)]
                summary[f"{mode}_over_fp_step_ratio"] = round(statistics.median(ratios), 3)
    print(json.dumps(summary))
    if not args.no_append:
        append_result(summary)


if __name__ == "__main__":
    main()
