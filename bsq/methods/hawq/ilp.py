"""HAWQ-V3's bit allocation as an integer linear program (methods-next.md "HAWQ-V3"; Zhen-Dong/HAWQ ILP.ipynb).

Binary x_{l,b} = 1 when layer l gets b bits, one per layer (sum_b x_{l,b} = 1):

    minimise   sum_{l,b} Omega_l(b) x_{l,b}
    subject to C_k + sum_{l,b} c_k[l, b] x_{l,b} <= limit_k     for every budget k (size MB, BitOPs G)
               x_{s,b} = x_{t,b}                                for tied layers (a shortcut and its block's conv1)

C_k is what the layers the ILP does not choose cost (fixed first / last layers, biases, float layers), c_k[l, b] what
layer l adds at b bits, both measured with the suite's accountant so the ILP's cost is the cost the tables report.
The authors' notebook solves the 4/8 case with PuLP + GLPK over integer x in {1, 2}; the one-hot form here allows any
candidate set, solved by scipy.optimize.milp (HiGHS). Rows are scaled (budgets by their limit, Omega by its range)
so HiGHS' absolute tolerances do not swamp MB-sized costs or tiny traces; the reported objective is unscaled.
Torch-free (numpy + scipy).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp

from bsq.errors import BSQError

__all__ = ["CostTable", "Budget", "Allocation", "allocate", "cheapest_cost"]

UNITS = {"size": "MB", "bitops": "GBitOPs"}


@dataclass(frozen=True)
class CostTable:
    """One cost as a function of the chosen bits: `constant` + sum_l per_layer[l][b_l]."""

    kind: str
    constant: float
    per_layer: Mapping[str, Mapping[int, float]]

    @property
    def unit(self) -> str:
        return UNITS.get(self.kind, self.kind)

    def of(self, bits: Mapping[str, int]) -> float:
        return self.constant + sum(self.per_layer[name][b] for name, b in bits.items())


def cheapest_cost(table: CostTable) -> float:
    """The smallest reachable cost: every layer at its cheapest candidate."""
    return table.constant + sum(min(costs.values()) for costs in table.per_layer.values())


@dataclass(frozen=True)
class Budget:
    kind: str  # a CostTable's kind
    limit: float
    key: str  # the config key (or input) that sets it, for the error message


@dataclass
class Allocation:
    bits: dict[str, int]
    objective: float
    status: str  # optimal | time_limit (the best feasible point found in time)
    time_s: float
    costs: dict[str, float] = field(default_factory=dict)  # each budget's cost at the chosen bits (predicted)

    def as_metrics(self) -> dict[str, Any]:
        return {
            "ilp_objective": self.objective,
            "ilp_status": self.status,
            "ilp_time_s": self.time_s,
            **{f"predicted_{kind}": value for kind, value in self.costs.items()},
        }


def _check_tables(omega: Mapping[str, Mapping[int, float]], tables: Mapping[str, CostTable]) -> list[int]:
    if not omega:
        raise BSQError("the ILP has no layer to choose bits for (every layer is fixed or float)")
    candidates = sorted(next(iter(omega.values())))
    for name, row in omega.items():
        if sorted(row) != candidates:
            raise BSQError(f"layer {name} has sensitivities for bits {sorted(row)}, others for {candidates}")
        for table in tables.values():
            if name not in table.per_layer or sorted(table.per_layer[name]) != candidates:
                raise BSQError(f"the {table.kind} cost table has no entry for every candidate of layer {name}")
    return candidates


def _check_reachable(tables: Mapping[str, CostTable], budgets: Sequence[Budget], candidates: list[int]) -> None:
    """Infeasible on its own: a budget below every layer's cheapest candidate. Say the floor and the key."""
    for budget in budgets:
        table = tables[budget.kind]
        floor = cheapest_cost(table)
        if floor > budget.limit * (1 + 1e-12):
            raise BSQError(
                f"no bit allocation meets the {budget.kind} budget {budget.limit:.6g} {table.unit}: the smallest "
                f"reachable cost is {floor:.6g} {table.unit} (every searched layer at its cheapest candidate of "
                f"{candidates}); raise {budget.key} to at least {floor:.6g}, or add lower bit-widths to hawq.candidates"
            )


def _scaled_objective(omega: Mapping[str, Mapping[int, float]], names: list[str], candidates: list[int]) -> np.ndarray:
    """Omega shifted by each layer's minimum (a constant of a one-hot choice) and divided by the largest spread."""
    rows = np.array([[float(omega[n][b]) for b in candidates] for n in names])
    rows = rows - rows.min(axis=1, keepdims=True)
    spread = float(rows.max())
    return (rows / spread if spread > 0 else rows).ravel()


def _constraints(
    names: list[str],
    candidates: list[int],
    tables: Mapping[str, CostTable],
    budgets: Sequence[Budget],
    ties: Sequence[tuple[str, str]],
) -> list[LinearConstraint]:
    n, k = len(names), len(candidates)
    index = {name: i for i, name in enumerate(names)}
    one_hot = np.kron(np.eye(n), np.ones((1, k)))
    out = [LinearConstraint(one_hot, 1, 1)]
    for a, b in ties:
        if a in index and b in index:
            tie = np.zeros((k, n * k))
            for j in range(k):
                tie[j, index[a] * k + j], tie[j, index[b] * k + j] = 1.0, -1.0
            out.append(LinearConstraint(tie, 0, 0))
    for budget in budgets:
        table = tables[budget.kind]
        row = np.array([table.per_layer[name][b] for name in names for b in candidates]) / budget.limit
        out.append(LinearConstraint(row[None, :], -np.inf, 1.0 - table.constant / budget.limit))
    return out


def allocate(
    omega: Mapping[str, Mapping[int, float]],
    tables: Mapping[str, CostTable],
    budgets: Sequence[Budget],
    ties: Sequence[tuple[str, str]] = (),
    time_limit: float = 60.0,
) -> Allocation:
    """The bits per layer minimising sum Omega_l(b_l) under every budget (see the module). Raises BSQError when no
    allocation meets the budgets, naming the smallest reachable cost and the key to change."""
    candidates = _check_tables(omega, tables)
    _check_reachable(tables, budgets, candidates)
    names = list(omega)
    start = time.perf_counter()
    result = milp(
        _scaled_objective(omega, names, candidates),
        integrality=np.ones(len(names) * len(candidates)),
        bounds=Bounds(0, 1),
        constraints=_constraints(names, candidates, tables, budgets, ties),
        options={"time_limit": float(time_limit)},
    )
    elapsed = time.perf_counter() - start
    if result.x is None or result.status not in (0, 1):
        floors = ", ".join(f"{b.kind} {cheapest_cost(tables[b.kind]):.6g} {tables[b.kind].unit}" for b in budgets)
        keys = ", ".join(b.key for b in budgets)
        raise BSQError(
            f"the bit-allocation ILP found no solution ({result.message}); the smallest reachable costs are {floors} "
            f"(tied layers must share bits): raise {keys} or add lower bit-widths to hawq.candidates"
        )
    x = np.rint(result.x).reshape(len(names), len(candidates))
    bits = {name: candidates[int(np.argmax(x[i]))] for i, name in enumerate(names)}
    objective = float(sum(omega[name][b] for name, b in bits.items()))
    costs = {b.kind: tables[b.kind].of(bits) for b in budgets}
    return Allocation(bits, objective, "optimal" if result.status == 0 else "time_limit", elapsed, costs)
