"""The one training loop every stage shares: devices, DDP, SGD with an epoch schedule, train/evaluate returning
metric dicts, non-finite-loss guard, and `Trainer`, which runs epochs with stage hooks and resumes exactly.

Stages plug their algorithm in through hooks: the BSQ search adds the regulariser gradient after `backward`,
projects the planes after each step and re-quantizes at the start of some epochs; finetuning clamps the latent
weights. Everything else (schedule, evaluation, best-epoch tracking, resume files, MLflow metrics) lives here.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bsq.config import OptimConfig, SpeedConfig
from bsq.errors import BSQError

__all__ = [
    "resolve_device",
    "Distributed",
    "epoch_seed",
    "init_seed",
    "seed_all",
    "make_optimizer",
    "set_lr",
    "train_one_epoch",
    "evaluate",
    "NonFiniteLoss",
    "Speed",
    "EpochAction",
    "Hooks",
    "Trainer",
]

log = logging.getLogger("bsq")
CHECK_EVERY = 50  # steps between non-finite-loss checks: each check is one device sync


class NonFiniteLoss(BSQError):
    """Training diverged; raised so the stage fails (and its MLflow run is marked FAILED) instead of going on."""


def resolve_device(spec: str = "auto") -> torch.device:
    """ "auto" picks CUDA when available; asking for CUDA on a machine without it is a clear error."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BSQError(f"device {spec!r} requested but CUDA is not available here; set device: cpu (or auto)")
    return device


@dataclass
class Distributed:
    """Process group for multi-GPU training under `torchrun` (WORLD_SIZE > 1); a single process otherwise.

    Every rank trains on its shard and evaluates the whole test set; only rank 0 writes files and logs to MLflow.
    """

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls, device_spec: str = "auto") -> Distributed:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(0, 1, resolve_device(device_spec))
        import torch.distributed as dist

        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = device_spec != "cpu" and torch.cuda.is_available()
        device = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
        if use_cuda:
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        """DDP wrapper for the forward/backward; re-wrap after re-quantization (parameters are replaced)."""
        if self.world_size == 1:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


@dataclass(frozen=True)
class Speed:
    """`SpeedConfig` resolved for one device: what the training loop actually does."""

    channels_last: bool = False
    amp: torch.dtype | None = None
    compile: bool = False

    @classmethod
    def resolve(cls, cfg: SpeedConfig | None, device: torch.device) -> Speed:
        cfg = cfg or SpeedConfig()
        cuda = device.type == "cuda"
        return cls(
            channels_last=cuda if cfg.channels_last is None else cfg.channels_last,
            amp=torch.bfloat16 if cfg.amp == "bf16" else None,
            compile=cfg.compile,
        )

    def images(self, images: torch.Tensor) -> torch.Tensor:
        return (
            images.contiguous(memory_format=torch.channels_last) if self.channels_last and images.dim() == 4 else images
        )

    def prepare(self, model: nn.Module) -> nn.Module:
        """4-d parameters to NHWC in place (same Parameter objects, so the optimizer keeps them); bit planes are
        5-d and stay as they are (`Module.to(memory_format=)` would refuse them)."""
        if self.channels_last:
            with torch.no_grad():
                for param in model.parameters():
                    if param.dim() == 4:
                        param.data = param.data.contiguous(memory_format=torch.channels_last)
        return model

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.amp or torch.bfloat16, enabled=self.amp is not None)


def epoch_seed(seed: int, epoch: int) -> int:
    """Seed of everything random in one epoch: a pure function of (seed, epoch), which is what makes a resumed run
    identical to an uninterrupted one."""
    return (seed * 1_000_003 + epoch * 7919) % (2**31 - 1)


def init_seed(seed: int) -> int:
    """Seed of what is drawn before the first epoch (model initialisation, PACT clips): a stream of its own,
    distinct from every epoch's, so that a run's starting weights are a pure function of its seed."""
    return epoch_seed(seed, -1)


def seed_all(seed: int) -> None:
    """Seed every generator a stage may draw from: Python's, NumPy's global one, torch's (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device


def _decayed(model: nn.Module) -> set[int]:
    """ids of the conv / linear weights that are not depthwise: FracBits' weight-decay set (fracbits.md §1.9)."""
    out = set()
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and not (
            isinstance(module, nn.Conv2d) and module.groups > 1 and module.groups == module.in_channels
        ):
            out.add(id(module.weight))
    return out


def make_optimizer(model: nn.Module, optim: OptimConfig, lr: float | None = None) -> torch.optim.SGD:
    """SGD with momentum. `weight_decay_on: all` decays every parameter, as BSQ's scripts (bits and scales
    included, P18); `weights` only the non-depthwise conv / linear weights, as FracBits' (bit-widths, PACT clips,
    BN and biases undecayed)."""
    params = list(model.parameters())
    if optim.weight_decay_on == "weights":
        decayed = _decayed(model)
        groups = [
            {"params": [p for p in params if id(p) in decayed], "weight_decay": optim.weight_decay},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": params, "weight_decay": optim.weight_decay}]
    return torch.optim.SGD(
        [g for g in groups if g["params"]],
        lr=optim.lr if lr is None else lr,
        momentum=optim.momentum,
        nesterov=optim.nesterov,
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _bar(iterable: Iterable, total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, disable=not enabled, dynamic_ncols=True)


def _check_finite(loss_sum: torch.Tensor, where: str) -> None:
    if not torch.isfinite(loss_sum):
        raise NonFiniteLoss(
            f"the training loss became {loss_sum.item()} ({where}). Training diverged: lower optim.lr (or bsq.alpha "
            "for the search) and re-run."
        )


def train_one_epoch(
    model: nn.Module,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    *,
    after_backward: Callable[[], torch.Tensor | None] | None = None,
    after_step: Callable[[], None] | None = None,
    before_step: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "train",
    speed: Speed | None = None,
) -> dict[str, float]:
    """One pass over `loader`: mean cross-entropy, top-1 and, when `after_backward` returns one, the mean of the
    value it returns (the search's R/TP). Metrics are accumulated on the device: one sync per CHECK_EVERY steps."""
    speed = speed or Speed()
    model.train()
    loss_sum = torch.zeros((), device=device)
    extra_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = steps = 0
    has_extra = False
    non_blocking = device.type == "cuda"
    for images, labels in _bar(loader, len(loader), desc, progress):
        if before_step is not None:
            before_step(steps)  # step index in this epoch (a per-iteration lr schedule)
        images = speed.images(images.to(device, non_blocking=non_blocking))
        labels = labels.to(device, non_blocking=non_blocking)
        with speed.autocast(device):
            logits = model(images).float()
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if after_backward is not None:
            value = after_backward()
            if value is not None:
                extra_sum += value.detach()
                has_extra = True
        optimizer.step()
        if after_step is not None:
            after_step()
        loss_sum += loss.detach() * labels.numel()
        correct += (logits.detach().argmax(1) == labels).sum()
        seen += labels.numel()
        steps += 1
        if steps % CHECK_EVERY == 0:
            _check_finite(loss_sum, f"{desc}, step {steps}")
    if seen == 0:
        raise BSQError("the training loader yielded no batches: the training (sub)set is empty for this rank")
    _check_finite(loss_sum, f"{desc}, end of epoch")
    totals = _sum_over_ranks(
        torch.stack([loss_sum, correct.to(loss_sum.dtype), torch.tensor(float(seen), device=device)])
    )
    loss_total, correct_total, seen_total = totals.tolist()
    out = {"loss": loss_total / seen_total, "top1": 100.0 * correct_total / seen_total}
    if has_extra:
        out["penalty"] = extra_sum.item() / steps  # the same on every rank: it is a function of the shared weights
    return out


def _sum_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """Sum over the DDP ranks (each trains on its own shard), so the logged training loss and top-1 cover the
    whole epoch rather than rank 0's shard; the identity in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: Iterable, device: torch.device, progress: bool = False, speed: Speed | None = None
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 (percent) over the whole loader, in eval mode, in float32 (the quantized model
    exactly, whatever `speed.amp` training used)."""
    speed = speed or Speed()
    model.eval()
    loss_sum = torch.zeros((), device=device)
    top1 = torch.zeros((), device=device, dtype=torch.long)
    top5 = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for images, labels in _bar(loader, len(loader), "eval", progress):
        images, labels = speed.images(images.to(device)), labels.to(device)
        logits = model(images)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        k = min(5, logits.shape[1])
        hits = logits.topk(k, dim=1).indices == labels[:, None]
        top1 += hits[:, 0].sum()
        top5 += hits.any(dim=1).sum()
        seen += labels.numel()
    if seen == 0:
        raise BSQError("the test loader yielded no batches")
    return {"loss": loss_sum.item() / seen, "top1": 100.0 * top1.item() / seen, "top5": 100.0 * top5.item() / seen}


class EpochAction(Enum):
    """What an `on_epoch_start` hook changed, so what the loop must redo before training the epoch."""

    REWRAP = "rewrap"  # which parameters train changed: wrap the model for DDP again, keep the optimizer and its
    # momentum (FracBits' hard assignment)
    RESET = "reset"  # a fresh optimizer too: BSQ's re-quantization changes shapes and the official code resets it (P9)


@dataclass
class Hooks:
    """Stage-specific steps of the loop. `on_epoch_start(epoch)` returns (metrics, action): action None (nothing
    changed) or an `EpochAction`."""

    after_backward: Callable[[nn.Module], torch.Tensor | None] | None = None
    after_step: Callable[[nn.Module], None] | None = None
    on_epoch_start: Callable[[int, nn.Module], tuple[dict[str, float], EpochAction | None]] | None = None
    epoch_metrics: Callable[[nn.Module], dict[str, float]] | None = None


@dataclass
class FitResult:
    model: nn.Module
    history: list[dict[str, float]]
    best: dict[str, float]  # the row of the best test-top-1 epoch (bearpaw-style selection on the test set, P14)
    # among epochs >= Trainer.best_after; empty when no epoch qualifies
    best_state: dict[str, torch.Tensor] | None  # state_dict of that epoch when keep_best


class Trainer:
    """Runs epochs [start, epochs) with the stage's hooks; after each epoch it logs metrics and writes an atomic
    resume file through `save_resume(payload_extra)`, so an interrupted job continues where it stopped."""

    def __init__(
        self,
        model: nn.Module,
        train_loader,
        test_loader,
        optim: OptimConfig,
        *,
        seed: int,
        dist: Distributed,
        hooks: Hooks | None = None,
        log_metrics: Callable[[dict[str, float], int], None] | None = None,
        save_resume: Callable[[nn.Module, dict[str, Any]], None] | None = None,
        keep_best: bool = False,
        best_after: int = 0,
        lr_per_step: bool = False,
        progress: bool = False,
        resume: dict[str, Any] | None = None,
        speed: Speed | None = None,
    ) -> None:
        self.model = model
        self.train_loader, self.test_loader = train_loader, test_loader
        self.optim, self.seed, self.dist = optim, seed, dist
        self.hooks = hooks or Hooks()
        self.log_metrics = log_metrics or (lambda metrics, step: None)
        self.save_resume = save_resume
        self.keep_best, self.progress = keep_best, progress
        self.best_after = best_after  # epochs before it are not candidates (FracBits: only discrete models count)
        self.lr_per_step = lr_per_step  # lr_at(e + k/S) before each step k (FracBits' per-iteration cosine)
        self.speed = speed or Speed()
        self.optimizer = make_optimizer(model, optim)
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        self.best: dict[str, float] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        if resume is not None:
            self._restore(resume)

    def _restore(self, resume: dict[str, Any]) -> None:
        state = resume["trainer"]
        if "optimizer" in resume:
            self.optimizer.load_state_dict(resume["optimizer"])
        self.start_epoch = int(resume["epoch"])
        self.history = list(state["history"])
        self.best = dict(state["best"])
        self.best_state = state.get("best_state")
        rng = state.get("rng")
        if rng:  # the epoch seeds make this redundant for the data; kept for any other consumer of the RNG
            torch.set_rng_state(rng["torch"])
            random.setstate(tuple(rng["python"][:1]) + (tuple(rng["python"][1]),) + tuple(rng["python"][2:]))
        log.info("resuming at epoch %d of %d", self.start_epoch, self.optim.epochs)

    def add_start_candidate(self, test: dict[str, float]) -> None:
        """Make the model as it is now, with test metrics `test`, the best so far (row epoch -1): the authors'
        finetune keeps its epoch-0 (pruned, untrained) state as best unless a trained epoch beats it (bsq.md §5.2).
        Call before `fit`, not on resume (the resume file carries the best row and state)."""
        self.best = {"epoch": -1, **{f"test_{k}": v for k, v in test.items()}}
        if self.keep_best:
            self.best_state = _snapshot(self.model)

    def _resume_payload(self, epoch: int) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "optimizer": self.optimizer.state_dict(),
            "trainer": {
                "history": self.history,
                "best": self.best,
                "best_state": self.best_state,
                "rng": {"torch": torch.get_rng_state(), "python": list(random.getstate())},
            },
        }

    def _wrap(self, model: nn.Module) -> nn.Module:
        """The module the training steps call: NHWC if asked, DDP across ranks, compiled if asked."""
        wrapped = self.dist.wrap(self.speed.prepare(model))
        return torch.compile(wrapped) if self.speed.compile else wrapped

    def _train_epoch(self, wrapped: nn.Module, epoch: int) -> dict[str, float]:
        model, hooks = self.model, self.hooks
        return train_one_epoch(
            wrapped,
            self.train_loader,
            self.optimizer,
            self.dist.device,
            after_backward=(lambda: hooks.after_backward(model)) if hooks.after_backward else None,
            after_step=(lambda: hooks.after_step(model)) if hooks.after_step else None,
            before_step=self._step_lr(epoch) if self.lr_per_step else None,
            progress=self.progress,
            desc=f"epoch {epoch + 1}/{self.optim.epochs}",
            speed=self.speed,
        )

    def _step_lr(self, epoch: int) -> Callable[[int], None]:
        """Sets the lr of step k of `epoch` to lr_at(epoch + k / S): the authors' FracBits scheduler steps every
        iteration (fracbits.md §1.9), so the cosine falls within an epoch too."""
        per_epoch = max(len(self.train_loader), 1)
        return lambda k: set_lr(self.optimizer, self.optim.lr_at(epoch + k / per_epoch))

    def fit(self) -> FitResult:
        model, hooks = self.model, self.hooks
        wrapped = self._wrap(model)
        for epoch in range(self.start_epoch, self.optim.epochs):
            seed_all(epoch_seed(self.seed, epoch))
            lr = self.optim.lr_at(epoch)
            row: dict[str, float] = {"epoch": epoch, "lr": lr}
            if hooks.on_epoch_start is not None:
                metrics, action = hooks.on_epoch_start(epoch, model)
                row.update(metrics)
                if action is not None and not isinstance(action, EpochAction):
                    raise ValueError(f"on_epoch_start must return None or an EpochAction, got {action!r}")
                if action is EpochAction.RESET:
                    self.optimizer = make_optimizer(model, self.optim, lr)
                if action is not None:
                    wrapped = self._wrap(model)
            set_lr(self.optimizer, lr)
            self.train_loader.set_epoch(epoch)
            started = time.perf_counter()
            with _explain_divergence(epoch, self.start_epoch, self.save_resume is not None):
                train = self._train_epoch(wrapped, epoch)
            trained = time.perf_counter()
            test = evaluate(model, self.test_loader, self.dist.device, self.progress, self.speed)
            # Wall-clock figures for users' planning; excluded from determinism checks.
            row["train_seconds"] = trained - started
            row["eval_seconds"] = time.perf_counter() - trained
            row.update({f"train_{k}": v for k, v in train.items()})
            row.update({f"test_{k}": v for k, v in test.items()})
            if hooks.epoch_metrics is not None:
                row.update(hooks.epoch_metrics(model))
            if epoch >= self.best_after and (not self.best or test["top1"] > self.best["test_top1"]):
                self.best = dict(row)
                if self.keep_best:
                    self.best_state = _snapshot(model)
            self.history.append(row)
            if self.dist.is_main:
                print(_format_row(row), file=sys.stderr, flush=True)
                self.log_metrics({k: v for k, v in row.items() if k != "epoch"}, epoch)
                if self.save_resume is not None:
                    self.save_resume(model, self._resume_payload(epoch + 1))
        return FitResult(model, self.history, self.best, self.best_state)


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A CPU copy of the model's state: the kept best epoch must not follow later training steps."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


@contextlib.contextmanager
def _explain_divergence(epoch: int, start_epoch: int, saves_resume: bool) -> Iterator[None]:
    """Says whether a diverged run can be resumed: only when an earlier epoch of this run left a resume file."""
    try:
        yield
    except NonFiniteLoss as exc:
        if saves_resume and epoch > 0:
            kept = f" The resume file of epoch {epoch} is kept; re-running the same command resumes from it."
        elif epoch == start_epoch == 0:
            kept = " No epoch completed, so there is nothing to resume from."
        else:
            kept = ""
        raise NonFiniteLoss(f"{exc}{kept}") from None


def _format_row(row: dict[str, float]) -> str:
    keys = (
        "epoch",
        "lr",
        "train_loss",
        "train_top1",
        "test_loss",
        "test_top1",
        "train_penalty",
        "avg_bits",
        "train_seconds",
    )
    parts = [f"{k}={row[k]:.4g}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row]
    return " ".join(parts)
