"""DNAS / EdMIPS as one stage (methods-next.md "DNAS and EdMIPS"): search -> argmax -> finetune in one run.

1. The float model gets FracBits' quantizers (DoReFa weights, PACT inputs, bsq.quant.qat), each searched layer a
   mixed layer over the candidate bit-widths (`supernet`), theta uniform (EdMIPS' fill 0.01);
2. search (`search_epochs`): weights train on CE; theta on CE + the complexity term on the expected cost, in the
   same step (`updates: joint`, EdMIPS search.py: one backward, both optimisers step) or on batches of a held-out
   split of the training set (`alternate`, DNAS), with its own optimiser (EdMIPS: SGD lr 0.01, decayed with the
   weights' schedule);
3. derivation at `search_epochs`: argmax per layer (EdMIPS fetch_best_arch), optionally repaired greedily to the
   target (`repair`), and every mixed layer replaced by the plain FracBits layer at its bits (Form.FRAC), a fresh
   optimiser (EdMIPS retrains the derived network with a new one);
4. finetune the fixed scheme on the whole training set; the kept model is the best test epoch after derivation.

An explicit target outside the candidates' range is an error; a matched one (a BSQ run's cost) runs at the nearest
reachable end (`target_used`, `budget_reachable: false`, `budget_floor` / `budget_ceiling`), budget_met judging the
requested cost.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bsq.budgets import MatchedTarget, budget_labels, clamp_matched, read_budget
from bsq.checkpoint import Form
from bsq.data import Loaders, TensorImageDataset, TrainLoader
from bsq.engine import EpochAction, FitResult, Hooks, evaluate
from bsq.errors import BSQError
from bsq.methods.dnas.config import DnasConfig, matched_cost
from bsq.methods.dnas.cost import ExpectedCost, complexity_term
from bsq.methods.dnas.supernet import (
    configure_,
    derive_,
    load_theta_state_,
    mixed_layers,
    save_theta_state_,
    theta_parameters,
    to_supernet_,
)
from bsq.quant.frac import frac_scheme
from bsq.quant.frac_cost import target_from_budget
from bsq.quant.qat import activation_range, qat_model, qat_model_args, qat_policy
from bsq.stages.context import RunContext, open_context
from bsq.stages.measure import cost_metrics, input_size
from bsq.stages.skeleton import Training, TrainingPlan, run_training

log = logging.getLogger("bsq")

Choices = dict[str, tuple[int, int | None]]


# ---- inputs -----------------------------------------------------------------------------------------------------
def _read_budget(ctx: RunContext) -> dict[str, Any] | None:
    d = ctx.cfg.dnas
    budget = None
    if "budget" in ctx.inputs:
        budget = read_budget(ctx.inputs["budget"], "DNAS")
        if d.target is not None:
            raise BSQError("give either dnas.target or a budget input, not both")
        if d.cost != matched_cost(d.match):
            raise BSQError(f"dnas.match: {d.match} needs dnas.cost: {matched_cost(d.match)}, got {d.cost}")
    elif d.target is None and d.complexity == "target":
        raise BSQError(
            "DNAS with dnas.complexity: target needs a target: set dnas.target (MB for cost: size, G for cost: "
            "bitops), give a budget input (a BSQ run's metrics.json, --budget PATH), or use dnas.complexity: edmips"
        )
    return budget


def _reach(cost: ExpectedCost, model: nn.Module) -> tuple[float, float]:
    """(lowest, highest) cost the candidates reach: every layer at its lowest, or at its highest, candidate."""
    low = cost.scheme_cost({n: (layer.w_cands[0], (layer.a_cands or [None])[0]) for n, layer in mixed_layers(model)})
    high = cost.scheme_cost({n: (layer.w_cands[-1], (layer.a_cands or [None])[-1]) for n, layer in mixed_layers(model)})
    return low, high


def _check_reachable(cost: ExpectedCost, model: nn.Module, target: float) -> None:
    """An explicit target (the user's number) must lie between the all-lowest and all-highest candidate schemes."""
    low, high = _reach(cost, model)
    if not low <= target <= high:
        raise BSQError(
            f"the DNAS target {target:.6g} {cost.unit} is outside what the candidates reach ({low:.6g} with every "
            f"layer at its lowest candidate, {high:.6g} at its highest); change the target or dnas.w_bits / a_bits"
        )


def _target(d: DnasConfig, budget: dict[str, Any] | None, cost: ExpectedCost, model: nn.Module) -> MatchedTarget | None:
    """dnas.target, checked (an unreachable one is the user's mistake: an error), or the budget's cost clamped into
    the reachable range: a BSQ run's cost outside it (0.87 average bits under a 1-bit floor) runs at the nearest
    end and reports the miss instead of failing the workflow. None: no target (complexity: edmips)."""
    if budget is None:
        if d.target is None:
            return None
        _check_reachable(cost, model, d.target)
        return MatchedTarget(d.target, d.target, *_reach(cost, model))
    return clamp_matched(target_from_budget(budget, d.match, cost), *_reach(cost, model), cost.unit, "DNAS")


# ---- the held-out split (DNAS) ------------------------------------------------------------------------------------
class _Indexed(torch.utils.data.Dataset):
    """A subset of a dataset whose items are (index, token) pairs (bsq.data's batch samplers)."""

    def __init__(self, dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitems__(self, items):
        return self.dataset.__getitems__([(self.indices[i], t) for i, t in items])


def _subset(dataset, index: torch.Tensor):
    if isinstance(dataset, TensorImageDataset):
        i = index.to(dataset.images.device)
        mean, std = dataset.mean.flatten().tolist(), dataset.std.flatten().tolist()
        images, labels = dataset.images[i].cpu(), dataset.labels[i].cpu()
        out = TensorImageDataset(images, labels, mean, std, dataset.scale, dataset.pad, dataset.flip, dataset.augment)
        return out.to(dataset.images.device)
    return _Indexed(dataset, index.tolist())


def holdout_split(n: int, holdout: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights' indices, theta's indices), each sorted: round(holdout n) examples drawn at random for theta, a
    function of the seed only (the same split on every rank, on resume, for every epoch)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 7919 + 104729))
    k = int(round(holdout * n))
    return order[k:].sort().values, order[:k].sort().values


def split_training(loaders: Loaders, holdout: float, ctx: RunContext) -> tuple[TrainLoader, TrainLoader]:
    """(weights' loader, theta's loader): a fixed random `holdout` share of the training set (a function of the
    seed) for theta, the rest for the weights, each sharded and shuffled as bsq.data's training loader. Done here:
    bsq.data builds one training loader per run."""
    full, cfg = loaders.train, ctx.cfg
    parts = holdout_split(len(full.dataset), holdout, cfg.seed)
    pin = bool(full.loader is not None and full.loader.pin_memory)
    out = []
    for what, index in zip(("weights", "theta"), parts, strict=True):
        if len(index) < 2 * ctx.dist.world_size:
            raise BSQError(f"dnas.holdout={holdout} leaves {len(index)} training examples for the {what}; change it")
        ds = _subset(full.dataset, index)
        bs = cfg.data.batch_size
        out.append(
            TrainLoader(ds, bs, cfg.seed, ctx.dist.rank, ctx.dist.world_size, cfg.data.workers, pin, full.resident)
        )
    return out[0], out[1]


# ---- the derivation ---------------------------------------------------------------------------------------------
def greedy_repair(cost: ExpectedCost, model: nn.Module, choices: Choices, target: float, tol: float) -> Choices:
    """Move the argmax scheme to the target one candidate step at a time (ours; the papers keep the argmax): over
    budget, lower the layer whose step costs the least log-probability per unit of cost saved; under by more than
    `tol`, raise the one that costs the least per unit added, never past target (1 + tol)."""
    layers = {n: layer for n, layer in mixed_layers(model) if layer.mixing}
    logp = {
        n: {k: layer.probs(k).log().tolist() for k in ("w", "a") if len(_cands(layer, k)) > 1}
        for n, layer in layers.items()
    }
    choices = dict(choices)
    for _ in range(10_000):
        now = cost.scheme_cost(choices)
        if abs(now / target - 1) <= tol:
            break
        over, best = now > target, None
        for name, layer in layers.items():
            for k, lp in logp[name].items():
                cands, slot = _cands(layer, k), 0 if k == "w" else 1
                i = cands.index(choices[name][slot])
                j = i - 1 if over else i + 1
                if not 0 <= j < len(cands):
                    continue
                trial = dict(choices)
                trial[name] = (cands[j], choices[name][1]) if slot == 0 else (choices[name][0], cands[j])
                c = cost.scheme_cost(trial)
                if c == now or (not over and c > target * (1 + tol)):
                    continue
                score = (lp[i] - lp[j]) / abs(c - now)
                if best is None or score < best[0]:
                    best = (score, trial)
        if best is None:
            break
        choices = best[1]
    return choices


def _cands(layer, kind: str) -> list[int]:
    return layer.w_cands if kind == "w" else layer.a_cands


def theta_probs(model: nn.Module) -> dict[str, dict[str, dict[str, float]]]:
    """{layer: {"w": {bits: pi}, "a": {bits: pi}}} of the searched layers (the final softmax(theta / T))."""
    out = {}
    for name, layer in mixed_layers(model):
        if layer.mixing:
            out[name] = {
                k: {str(c): round(float(p), 6) for c, p in zip(_cands(layer, k), layer.probs(k).tolist(), strict=True)}
                for k in ("w", "a")
                if len(_cands(layer, k)) > 1
            }
    return out


def theta_optimizer(d: DnasConfig, thetas: list[nn.Parameter]) -> torch.optim.Optimizer:
    """EdMIPS' arch_optimizer (search.py: SGD, lr --lra 0.01, momentum 0.9, weight decay 1e-4), or Adam."""
    if d.theta_optimizer == "sgd":
        return torch.optim.SGD(thetas, d.theta_lr, momentum=d.theta_momentum, weight_decay=d.theta_weight_decay)
    return torch.optim.Adam(thetas, d.theta_lr, (d.theta_momentum, 0.999), weight_decay=d.theta_weight_decay)


# ---- the schedule -------------------------------------------------------------------------------------------------
class _Search:
    """The search around the shared skeleton: theta's optimiser and complexity term while searching, the
    derivation at `search_epochs`, the loaders of each phase, and the metrics of both phases. The search and the
    repair aim at the target used (`self.target`), budget_met judges the requested one (`self.requested`): they
    differ for a matched budget outside the candidates' range."""

    def __init__(
        self, d: DnasConfig, search_epochs: int, target: MatchedTarget | None, shape, full: TrainLoader, theta_loader
    ):
        self.d, self.search_epochs, self.shape = d, search_epochs, shape
        self.target = target.used if target is not None else None
        self.requested = target.requested if target is not None else None
        self.full, self.theta_loader, self.theta_batches = full, theta_loader, None
        self.cost: ExpectedCost | None = None
        self.thetas: list[nn.Parameter] = []
        self.optimizer: torch.optim.Optimizer | None = None
        self.theta_on, self.job = False, None

    def prepare(self, job: Training) -> None:
        """Cost model and theta optimiser of the model on its device, fresh or resumed (theta's optimiser state
        travels in the model's buffers, `save_theta_state_`)."""
        d, self.job = self.d, job
        self.cost = ExpectedCost(job.model, self.shape, d.cost)
        self.unit = self.cost.unit_cost()
        self.thetas = theta_parameters(job.model)
        if self.thetas:
            self.optimizer = theta_optimizer(d, self.thetas)
            load_theta_state_(job.model, self.optimizer)  # a resumed search: theta's momentum from the model

    @staticmethod
    def searching(m: nn.Module) -> bool:
        return any(layer.mixing for _, layer in mixed_layers(m))

    def start_epoch(self, epoch: int, m: nn.Module) -> tuple[dict[str, Any], EpochAction | None]:
        job = self.job
        if self.searching(m) and epoch >= self.search_epochs:
            return self.derive(epoch, m)
        if not self.searching(m):
            job.trainer.train_loader = self.full  # finetune (also after a resume past the derivation)
            return {}, None
        d, optim = self.d, job.ctx.cfg.optim
        temperature = d.temperature_at(epoch)
        configure_(m, temperature, d.mixture == "gumbel")
        for group in self.optimizer.param_groups:  # EdMIPS' adjust_learning_rate: lra follows lr's schedule
            group["lr"] = d.theta_lr * optim.lr_at(epoch) / optim.lr
        self.theta_on = epoch >= d.warmup_epochs
        if self.theta_loader is not None:
            self.theta_loader.set_epoch(epoch)
            self.theta_batches = iter(self.theta_loader)
        return {"temperature": temperature, "theta_lr": self.optimizer.param_groups[0]["lr"]}, None

    def _held_out_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            return next(self.theta_batches)
        except StopIteration:  # fewer held-out batches than weight steps: go round again
            self.theta_batches = iter(self.theta_loader)
            return next(self.theta_batches)

    def complexity(self) -> torch.Tensor:
        d = self.d
        return complexity_term(self.cost(), d.complexity, d.lam_value, self.target, self.unit)

    def after_backward(self, m: nn.Module) -> torch.Tensor | None:
        """EdMIPS (joint): theta's CE gradient of this step + the complexity term's, theta's own step. DNAS
        (alternate): the CE gradient of a held-out batch instead. theta's gradient is cleared before the weights'
        optimiser steps, so that one (which holds every parameter) leaves theta alone."""
        if not self.thetas or not self.searching(m):
            return None
        if not self.theta_on:
            _clear(self.thetas)
            return None
        penalty = self.complexity()
        if self.d.updates == "joint":
            penalty.backward()
        else:
            _clear(self.thetas)
            images, labels = self._held_out_batch()
            device = self.job.ctx.device
            loss = F.cross_entropy(m(images.to(device)).float(), labels.to(device)) + penalty
            for p, g in zip(self.thetas, torch.autograd.grad(loss, self.thetas), strict=True):
                p.grad = _mean_over_ranks(g)
        self.optimizer.step()
        _clear(self.thetas)
        return penalty.detach()

    def derive(self, epoch: int, m: nn.Module) -> tuple[dict[str, Any], EpochAction]:
        """argmax per layer (repaired to the target when asked), then the plain FracBits model at those bits."""
        job, d, target = self.job, self.d, self.target
        with torch.no_grad():
            expected = float(self.cost())
        choices: Choices = {n: layer.argmax_bits() for n, layer in mixed_layers(m)}
        argmax_cost = self.cost.scheme_cost(choices)
        if d.repair == "greedy" and target is not None:
            choices = greedy_repair(self.cost, m, choices, target, d.tolerance)
        probs = theta_probs(m)
        derive_(m, choices)
        self.cost = ExpectedCost(m, self.shape, d.cost)
        achieved = float(self.cost())
        record: dict[str, Any] = {"derive_epoch": epoch, "expected_cost": expected, "argmax_cost": argmax_cost}
        record["derived_cost"] = achieved
        requested = self.requested
        if requested is not None:
            record["derived_cost_rel_error"] = achieved / requested - 1
            record["budget_met"] = abs(achieved / requested - 1) <= d.tolerance
            if not record["budget_met"]:
                log.warning(
                    "DNAS derivation: the scheme costs %.4g %s, %+.1f %% off the target %.4g",
                    achieved,
                    self.cost.unit,
                    100 * (achieved / requested - 1),
                    requested,
                )
        after = evaluate(m, job.plan.loaders.test, job.ctx.device, job.ctx.progress)
        job.start_metrics.update(record, theta_probs=probs, top1_before_ft=after["top1"], top5_before_ft=after["top5"])
        job.trainer.train_loader = self.full
        return {k: float(v) for k, v in record.items()} | {"derived_top1": after["top1"]}, EpochAction.RESET

    def epoch_metrics(self, m: nn.Module) -> dict[str, float]:
        if self.optimizer is not None and self.searching(m):
            save_theta_state_(m, self.optimizer)  # before the epoch's resume file is written
        with torch.no_grad():
            now = float(self.cost())
        out = {"expected_cost" if self.searching(m) else "cost": now}
        if self.target is not None:
            out["cost_rel_error"] = now / self.target - 1
        bits = frac_scheme(m)  # the argmax bits while searching (what the layers would be derived to)
        weights = [v for k, v in bits.items() if not k.endswith(".act")]
        return {**out, "mean_w_bits": sum(weights) / len(weights), **{f"bits/{k}": v for k, v in bits.items()}}

    def hooks(self, job: Training) -> Hooks:
        return Hooks(
            after_backward=self.after_backward, on_epoch_start=self.start_epoch, epoch_metrics=self.epoch_metrics
        )

    def final_metrics(self, job: Training, fit: FitResult) -> dict[str, Any]:
        d, final = self.d, job.evaluate()
        achieved = float(self.cost())
        out = {
            "top1": final["top1"],
            "top5": final["top5"],
            "best_epoch": fit.best.get("epoch"),
            "final_top1": fit.history[-1]["test_top1"],
            "search_epochs": self.search_epochs,
            "cost_kind": d.cost,
            "tolerance": d.tolerance,
            "achieved_cost": achieved,
            "scheme": frac_scheme(job.model),
            "selection": "best test top-1 epoch after the derivation",
            **cost_metrics(job.model, job.plan.loaders.info, job.ctx.cfg.data.image_size),
        }
        if self.requested is not None:
            out["budget_met"] = abs(achieved / self.requested - 1) <= d.tolerance
        return out


def _clear(params: list[nn.Parameter]) -> None:
    for p in params:
        p.grad = None


def _mean_over_ranks(g: torch.Tensor) -> torch.Tensor:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        g = g.clone()
        dist.all_reduce(g)
        g /= dist.get_world_size()
    return g


def _labels(d: DnasConfig, target: float | None, budget: dict[str, Any] | None) -> dict[str, Any]:
    labels = {"cost": d.cost, "mixture": d.mixture, "updates": d.updates}
    if target is not None:
        labels["target"] = f"{target:.6g}"
    labels.update(budget_labels(budget, d.match))
    return labels


def run(config: Mapping[str, Any] | None, inputs: Mapping[str, Any] | None, outputs: Mapping[str, Any]) -> dict:
    ctx = open_context("dnas", config, inputs, outputs)
    cfg, d = ctx.cfg, ctx.cfg.dnas
    search_epochs = d.search_epochs_of(cfg.optim.epochs)
    budget = _read_budget(ctx)
    parent = ctx.read_parent("checkpoint", forms=(Form.FLOAT,))
    a_range = (d.a_bits[0], d.a_bits[-1]) if d.a_bits is not None else activation_range(cfg.model.act_bits)
    policy = qat_policy(cfg.qat, cfg.model.act_bits, w_bits=(d.w_bits[0], d.w_bits[-1]), a_bits=a_range)
    loaders = ctx.loaders()
    shape = input_size(loaders.info, cfg.data.image_size)
    model = to_supernet_(qat_model(parent, policy, shape, ctx.inputs["checkpoint"]), d.w_bits, d.a_bits, d.theta_init)
    probe = ExpectedCost(model, shape, d.cost)
    target = _target(d, budget, probe, model)
    weights, theta = split_training(loaders, d.holdout, ctx) if d.updates == "alternate" else (loaders.train, None)
    search = _Search(d, search_epochs, target, shape, loaders.train, theta)
    plan = TrainingPlan(
        parent=parent,
        loaders=Loaders(train=weights, test=loaders.test, info=loaders.info),
        model=model,
        model_args=qat_model_args(parent),
        policy=policy.to_dict(),  # the derived model's (Form.FRAC); the supernet rebuilds from it too (`build`)
        method="dnas",
        labels=_labels(d, target.requested if target is not None else None, budget),
        prepare=search.prepare,
        evaluate_start=False,
        start_metrics=lambda job, _: {
            **({"target": target.requested, **target.metrics()} if target is not None else {}),
            "initial_cost": float(probe().detach()),
            "complexity": d.complexity,
            "lam": d.lam_value,
        },
        hooks=search.hooks,
        keep_best=True,
        best_after=search_epochs,
        final_metrics=search.final_metrics,
        outputs=lambda job, metrics: job.artifacts.write_json("scheme", frac_scheme(job.model)),
    )
    return run_training(ctx, plan)
