"""Per-layer Hessian traces by Hutchinson's estimator: the sensitivity measure of HAWQ-V3 (its Omega_l) and of MSQ's
multi-LSB pruning (methods-next.md, HAWQ-V3 and MSQ sections).

For a loss L and a layer's weights w_l, Tr(H_l) = E_v[v_l^T H_ll v_l] over Rademacher vectors v (entries +-1 with
equal probability), since E[v v^T] = I. One Hessian-vector product by double backprop,
Hv = d(g . v)/dw with g = dL/dw kept in the graph, gives the estimate for every layer at once: the blocks of v are
independent, so v_l^T (Hv)_l estimates the trace of the diagonal block H_ll alone (the cross-layer blocks average
out). The variance comes from off-diagonal entries only (within the block and across layers): for a diagonal
Hessian the estimate is exact from the first sample (v_i^2 = 1).

Sampling stops per batch when every layer's standard error is at most `rel_tol` of its mean's magnitude (after
`min_samples`), or at `max_samples`; `converged` records which. With several batches, the trace is the mean over
batches: the Hessian of the mean loss is the mean of the Hessians.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch

from bsq.errors import BSQError

__all__ = ["HessianTrace", "hutchinson_traces", "rademacher"]


@dataclass(frozen=True)
class HessianTrace:
    """One layer's estimate: `trace` of its Hessian block, its standard error, and how it was obtained."""

    trace: float
    std_error: float
    numel: int
    samples: int  # Hessian-vector products per batch (the most any batch took)
    converged: bool  # every batch met the tolerance before max_samples

    @property
    def per_param(self) -> float:
        """Tr(H_l) / n_l: HAWQ-V3's average eigenvalue, the factor of its sensitivity Omega_l(b)."""
        return self.trace / self.numel

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "trace": self.trace,
            "per_param": self.per_param,
            "std_error": self.std_error,
            "numel": self.numel,
            "samples": self.samples,
            "converged": self.converged,
        }


def rademacher(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Entries +-1 with equal probability, drawn on the CPU generator (the same draws on any device)."""
    draws = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (draws.to(like.device, like.dtype) * 2) - 1


@dataclass
class _Running:
    """Welford's running mean and variance of one layer's samples."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    def add(self, x: float) -> None:
        self.n += 1
        delta = x - self.mean
        self.mean += delta / self.n
        self.m2 += delta * (x - self.mean)

    @property
    def std_error(self) -> float:
        return math.sqrt(self.m2 / (self.n - 1) / self.n) if self.n > 1 else math.inf

    def settled(self, rel_tol: float) -> bool:
        return self.std_error <= rel_tol * abs(self.mean) or self.m2 == 0.0 and self.n > 1


def _check(params: Mapping[str, torch.Tensor], max_samples: int, min_samples: int, rel_tol: float) -> None:
    if max_samples < 1:
        raise BSQError(f"the Hutchinson sample count must be >= 1, got {max_samples}")
    if not 1 <= min_samples <= max_samples:
        raise BSQError(f"min_samples must be in 1..max_samples ({max_samples}), got {min_samples}")
    if not rel_tol > 0:
        raise BSQError(f"the Hutchinson tolerance must be > 0, got {rel_tol}")
    if not params:
        raise BSQError("no parameters to estimate Hessian traces for")


def _batch_traces(
    loss: torch.Tensor,
    params: Mapping[str, torch.Tensor],
    max_samples: int,
    min_samples: int,
    rel_tol: float,
    generator: torch.Generator,
) -> dict[str, _Running]:
    """Sample v^T H v for every layer on one batch's loss until the estimates settle."""
    names = list(params)
    tensors = [params[n] for n in names]
    grads = torch.autograd.grad(loss, tensors, create_graph=True)
    running = {n: _Running() for n in names}
    for i in range(max_samples):
        vs = [rademacher(t, generator) for t in tensors]
        hvs = torch.autograd.grad(grads, tensors, grad_outputs=vs, retain_graph=i + 1 < max_samples)
        for name, v, hv in zip(names, vs, hvs, strict=True):
            running[name].add(float((v * hv).sum()))
        if i + 1 >= min_samples and all(r.settled(rel_tol) for r in running.values()):
            break
    return running


def hutchinson_traces(
    loss_of: Callable[[object], torch.Tensor],
    batches: Iterable[object],
    params: Mapping[str, torch.Tensor],
    *,
    max_samples: int = 200,
    min_samples: int = 8,
    rel_tol: float = 0.05,
    seed: int = 0,
) -> dict[str, HessianTrace]:
    """Tr(H_l) of the loss `loss_of(batch)` for every tensor of `params` (name -> a leaf requiring grad), averaged
    over `batches`. The caller puts the model in the mode it wants the Hessian of (HAWQ-V3: eval, BN frozen)."""
    _check(params, max_samples, min_samples, rel_tol)
    generator = torch.Generator().manual_seed(seed)
    per_batch: list[dict[str, _Running]] = []
    for batch in batches:
        per_batch.append(_batch_traces(loss_of(batch), params, max_samples, min_samples, rel_tol, generator))
    if not per_batch:
        raise BSQError("no batches to estimate Hessian traces on")
    out = {}
    for name, tensor in params.items():
        runs = [b[name] for b in per_batch]
        k = len(runs)
        error = math.sqrt(sum(r.std_error**2 if r.n > 1 else 0.0 for r in runs)) / k
        out[name] = HessianTrace(
            trace=sum(r.mean for r in runs) / k,
            std_error=error,
            numel=tensor.numel(),
            samples=max(r.n for r in runs),
            converged=all(r.n < max_samples or r.settled(rel_tol) for r in runs),
        )
    return out
