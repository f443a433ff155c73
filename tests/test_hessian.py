"""Hutchinson's per-layer Hessian traces (bsq.quant.hessian) against analytic traces of quadratic losses."""

from __future__ import annotations

import pytest
import torch

from bsq.errors import BSQError
from bsq.quant.hessian import hutchinson_traces, rademacher


def _quadratic(a1: torch.Tensor, a2: torch.Tensor, coupling: float = 0.0):
    """L = 1/2 w1^T A1 w1 + 1/2 w2^T A2 w2 + c * sum(w1) * sum(w2): H_11 = A1, H_22 = A2 (the coupling lies in the
    off-diagonal block, which the per-layer trace must ignore)."""
    w1 = torch.randn(a1.shape[0], dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(a2.shape[0], dtype=torch.float64, requires_grad=True)

    def loss(_batch):
        return 0.5 * w1 @ a1 @ w1 + 0.5 * w2 @ a2 @ w2 + coupling * w1.sum() * w2.sum()

    return {"one": w1, "two": w2}, loss


def test_a_diagonal_hessian_is_exact_from_the_first_sample():
    params, loss = _quadratic(
        torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)),
        torch.diag(torch.tensor([10.0, -4.0], dtype=torch.float64)),
    )
    traces = hutchinson_traces(loss, [None], params, max_samples=50, min_samples=2)
    assert traces["one"].trace == pytest.approx(6.0, abs=1e-12)  # 1 + 2 + 3
    assert traces["two"].trace == pytest.approx(6.0, abs=1e-12)  # 10 - 4
    assert traces["two"].per_param == pytest.approx(3.0)
    assert traces["one"].converged and traces["one"].samples == 2  # zero variance: settled at once


def test_cross_layer_coupling_averages_out():
    a1, a2 = torch.diag(torch.tensor([1.0, 2.0], dtype=torch.float64)), torch.eye(3, dtype=torch.float64)
    params, loss = _quadratic(a1, a2, coupling=0.5)
    traces = hutchinson_traces(loss, [None], params, max_samples=5000, rel_tol=0.01, seed=1)
    for name, exact in (("one", 3.0), ("two", 3.0)):
        assert abs(traces[name].trace - exact) <= 4 * traces[name].std_error, (name, traces[name])
        assert traces[name].samples > 2  # the coupling adds variance: more than the minimum


def test_dense_block_converges_to_the_analytic_trace_within_its_error():
    torch.manual_seed(0)
    m = torch.randn(12, 12, dtype=torch.float64)
    a = m @ m.T  # symmetric PSD, trace = ||m||_F^2
    params, loss = _quadratic(a, torch.eye(3, dtype=torch.float64))
    traces = hutchinson_traces(loss, [None, None], params, max_samples=4000, rel_tol=0.01, seed=3)
    exact = float(torch.trace(a))
    est = traces["one"]
    assert est.converged
    assert abs(est.trace - exact) <= 4 * est.std_error  # within 4 standard errors
    assert abs(est.trace - exact) / exact < 0.05


def test_rademacher_draws_are_plus_minus_one_and_seeded():
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    v = rademacher(torch.zeros(1000), g1)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(v, rademacher(torch.zeros(1000), g2))


def test_a_network_layers_traces_match_the_exact_hessian():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    w = net[2].weight

    def loss_of_w(weight):
        return torch.nn.functional.cross_entropy(torch.nn.functional.linear(net[1](net[0](x)), weight, net[2].bias), y)

    exact = float(torch.autograd.functional.hessian(loss_of_w, w.detach()).reshape(8, 8).trace())
    est = hutchinson_traces(
        lambda _: torch.nn.functional.cross_entropy(net(x), y), [None], {"fc": w}, max_samples=3000, rel_tol=0.005
    )["fc"]
    assert abs(est.trace - exact) <= max(4 * est.std_error, 1e-6)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"max_samples": 0}, "sample count must be >= 1"), ({"rel_tol": 0}, "tolerance must be > 0")],
)
def test_bad_settings_are_refused(kwargs, message):
    params, loss = _quadratic(torch.eye(2, dtype=torch.float64), torch.eye(2, dtype=torch.float64))
    with pytest.raises(BSQError, match=message):
        hutchinson_traces(loss, [None], params, **{"min_samples": 1, **kwargs})
