"""CSQ's config section and its epoch schedule (methods-next.md CSQ; lawsonX/CSQ main_cifar.py, dist_img_cs.py).
Torch-free: the workflow validates it at parse time."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from bsq.checks import is_int, is_number, require
from bsq.errors import BSQError
from bsq.quant.limits import MAX_BITS

__all__ = ["CSQConfig", "CSQSchedule", "MATCHES", "SHARES", "PLANE_INITS"]

Match = Literal["compression", "size", "avg_bits"]
Share = Literal["gates", "params"]
PlaneInit = Literal["digits", "signed"]
MATCHES: tuple[str, ...] = get_args(Match)
SHARES: tuple[str, ...] = get_args(Share)
PLANE_INITS: tuple[str, ...] = get_args(PlaneInit)
TICKET_SHARE = 0.99  # default ticket: int(0.99 E) soft epochs, the README's --epochs 600 --ticket 595 (594 soft)


@dataclass
class CSQConfig:
    """CSQ (Xiao et al., DAC 2023): bit planes p, n and one gate per bit position, relaxed by sigmoid(beta x); the
    budget-aware regulariser pulls the share of open gates to `target / nbits`; gates harden at `ticket`; the
    exact model is exported to BSQ bit layers at the end. Defaults: the README's CIFAR-10 recipe (N 8, lambda 0.01,
    final temperature 200) unless a comment says otherwise."""

    nbits: int = 8  # N, bit planes per weight (README: --Nbits 8)
    target: float | None = None  # average weight bits; None = from the `budget` input (a BSQ run) via `match`
    match: Match = "compression"  # budget input: its compression (32 / c average bits) | size (MB) | avg_bits
    # R1, the share of open gates: "gates" = every gate counts once (authors' get_ratio_one) | "params" = each gate
    # weighted by its layer's weight count, so N R1 is the size-weighted average bits (ours; the matched points)
    share: Share = "gates"
    lmbda: float = 0.01  # lambda of the budget-aware term (README CIFAR: 0.01; ImageNet and main_cifar default 0.001)
    final_temp: float = 200.0  # beta at the ticket (--final-temp 200)
    ticket: int | None = None  # soft-gate epochs (0-based epoch where gates harden); None = int(0.99 E), < E
    gate_init: float = 0.0  # s_b at the start (--mask-initial-value 0: sigmoid 0.5, counted open)
    # planes' start values: "digits" = the binary digits {0, 1} as the authors' ini2bit (sigmoid maps 0 to 1/2,
    # cancelling between p and n) | "signed" = 2 digit - 1 (ours: sigmoid(beta p) -> digit as beta grows)
    plane_init: PlaneInit = "digits"
    rounds: int = 1  # soft rounds (ImageNet script: 3, each beta 1 -> final, gates reset between, then a hard round)
    rewind: int = 2  # rounds > 1: epoch of round 0 whose planes the hard round rewinds to (--rewind 2)
    compact: bool = True  # drop all-zero MSB / LSB planes at export (BSQ's pruning(0)): the accountant's bits shrink
    tolerance: float = 0.05  # budget_met: accountant average bits within 5 % of the target (ours; gates are coarse)

    def __post_init__(self) -> None:
        require(
            is_int(self.nbits) and 1 <= self.nbits <= MAX_BITS, "csq.nbits", f"an integer in 1..{MAX_BITS}", self.nbits
        )
        ok = self.target is None or (is_number(self.target) and 0 < self.target <= self.nbits)
        require(ok, "csq.target", f"null or average bits in (0, csq.nbits = {self.nbits}]", self.target)
        require(self.match in MATCHES, "csq.match", " | ".join(MATCHES), self.match)
        require(self.share in SHARES, "csq.share", " | ".join(SHARES), self.share)
        require(self.plane_init in PLANE_INITS, "csq.plane_init", " | ".join(PLANE_INITS), self.plane_init)
        require(is_number(self.lmbda) and self.lmbda >= 0, "csq.lmbda", "a number >= 0", self.lmbda)
        require(is_number(self.final_temp) and self.final_temp > 1, "csq.final_temp", "a number > 1", self.final_temp)
        ok = self.ticket is None or (is_int(self.ticket) and self.ticket >= 1)
        require(ok, "csq.ticket", "null or an integer >= 1 (soft-gate epochs)", self.ticket)
        require(is_number(self.gate_init), "csq.gate_init", "a number", self.gate_init)
        require(is_int(self.rounds) and self.rounds >= 1, "csq.rounds", "an integer >= 1", self.rounds)
        require(is_int(self.rewind) and self.rewind >= 0, "csq.rewind", "an integer >= 0", self.rewind)
        require(isinstance(self.compact, bool), "csq.compact", "true or false", self.compact)
        require(is_number(self.tolerance) and 0 < self.tolerance < 1, "csq.tolerance", "in (0, 1)", self.tolerance)

    def schedule(self, epochs: int) -> CSQSchedule:
        """The run's epoch schedule, or a BSQError naming the key when the epochs cannot hold it."""
        if epochs < 2:
            raise BSQError(f"CSQ needs optim.epochs >= 2 (soft gates, then hard gates), got {epochs}")
        ticket = min(int(TICKET_SHARE * epochs), epochs - 1) if self.ticket is None else self.ticket
        ticket = max(ticket, 1)
        if ticket >= epochs:
            raise BSQError(
                f"csq.ticket={ticket} must be < optim.epochs={epochs}: the gates harden at the ticket and the model "
                "trains on with hard gates at least one epoch (lower csq.ticket or raise optim.epochs)"
            )
        if ticket % self.rounds:
            raise BSQError(
                f"csq.rounds={self.rounds} must divide csq.ticket={ticket}: each soft round's temperature runs 1 -> "
                "csq.final_temp, so a round cut short would end the temperature schedule before the ticket"
            )
        if self.rounds > 1 and self.rewind >= ticket // self.rounds:
            raise BSQError(
                f"csq.rewind={self.rewind} must fall in round 0 (< {ticket // self.rounds} epochs): lower csq.rewind"
            )
        return CSQSchedule(epochs, ticket, self.rounds, float(self.final_temp), self.rewind)


@dataclass(frozen=True)
class CSQSchedule:
    """Temperature and gate phase per 0-based epoch e.

    One round (main_cifar.py): beta(e) = final^((e + 1) / (ticket + 1)), growing on after the ticket; the authors
    count epochs from 1 with beta = final^(k / ticket_a) and harden at k >= ticket_a, so our ticket = ticket_a - 1
    soft epochs and beta = final exactly at the first hard epoch, as theirs.
    Rounds > 1 (dist_img_cs.py): `rounds` soft rounds of L = ticket / rounds epochs, beta = final^(j / (L - 1)) at
    epoch j of a round; between rounds s <- min(final s, s0); the planes of epoch `rewind` of round 0 are kept and
    restored at the ticket; the hard round's beta again runs 1 -> final over the remaining epochs."""

    epochs: int
    ticket: int
    rounds: int
    final_temp: float
    rewind: int

    @property
    def round_epochs(self) -> int:
        return self.ticket // self.rounds

    def beta(self, epoch: int) -> float:
        if self.rounds == 1:
            return self.final_temp ** ((epoch + 1) / (self.ticket + 1))
        if epoch < self.ticket:
            j, length = epoch % self.round_epochs, self.round_epochs
        else:
            j, length = epoch - self.ticket, self.epochs - self.ticket
        return self.final_temp ** (j / max(length - 1, 1))

    def hard(self, epoch: int) -> bool:
        return epoch >= self.ticket

    def resets_gates(self, epoch: int) -> bool:
        """Start of soft round r >= 1: the continuous-sparsification reset of the gates."""
        return self.rounds > 1 and 0 < epoch < self.ticket and epoch % self.round_epochs == 0

    def snapshots(self, epoch: int) -> bool:
        return self.rounds > 1 and epoch == self.rewind

    def rewinds(self, epoch: int) -> bool:
        return self.rounds > 1 and epoch == self.ticket
