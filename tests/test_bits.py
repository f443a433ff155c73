"""Bit-plane arithmetic against the spec's hand-computed examples (Appendix B) and exact invariants."""

import pytest
import torch

from bsq.quant import bits as B


def test_place_values_three_bits():
    assert torch.allclose(B.place_values(3, torch.float64), torch.tensor([4 / 7, 2 / 7, 1 / 7], dtype=torch.float64))


def test_float_to_planes_appendix_b1():
    """W = [0.5, -1, 0, 0.2] at N = 3: s = 1, I+ = [4,0,0,1], I- = [0,7,0,0] (spec App. B.1)."""
    p = B.float_to_planes(torch.tensor([0.5, -1.0, 0.0, 0.2]), 3)
    assert p.nbits == 3 and float(p.scale) == 1.0
    assert p.pos.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0], [0, 0, 1]]
    assert p.neg.tolist() == [[0, 0, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    u = B.planes_to_unit(p.pos, p.neg, B.place_values(3))
    assert torch.allclose(u, torch.tensor([4 / 7, -1.0, 0.0, 1 / 7]))


def test_float_to_planes_rounds_half_to_even():
    """2.5/7 with s = 1 -> I = 2 -> p = [0, 1, 0] (spec App. B.1 step 5)."""
    p = B.float_to_planes(torch.tensor([2.5 / 7, 1.0]), 3)
    assert p.pos[0].tolist() == [0, 1, 0]


@pytest.mark.parametrize("nbits", [1, 2, 3, 4, 5, 8, 12])
def test_round_trip_is_exact_on_the_grid(nbits):
    """Weights already on the N-bit grid survive float -> planes -> float exactly (integers compared)."""
    k = 2**nbits - 1
    ints = torch.randint(-k, k + 1, (257,))
    ints[0] = k  # pin the max so s = 1 exactly
    planes = B.float_to_planes(ints.double() / k, nbits)
    recovered = B.unit_to_levels(
        B.planes_to_unit(planes.pos.double(), planes.neg.double(), B.place_values(nbits, torch.float64)),
        nbits,
    )
    assert torch.equal(recovered, ints)


@pytest.mark.parametrize("nbits", [2, 4, 8])
def test_round_trip_error_is_at_most_half_a_step(nbits):
    w = torch.randn(1000, dtype=torch.float64)
    p = B.float_to_planes(w, nbits)
    back = p.scale * B.planes_to_unit(p.pos, p.neg, B.place_values(nbits, torch.float64))
    assert (back - w).abs().max() <= float(p.scale) / (2 * (2**nbits - 1)) + 1e-12


def test_planes_are_binary_and_disjoint():
    p = B.float_to_planes(torch.randn(500), 6)
    assert set(p.pos.unique().tolist()) <= {0.0, 1.0}
    assert not ((p.pos > 0) & (p.neg > 0)).any()


def test_requantize_overflow_adds_a_bit_appendix_b2():
    """Spec App. B.2: weight 3 at u = 10/7 overflows -> N = 4, s = 15/7, planes as listed."""
    p = B.float_to_planes(torch.tensor([0.5, -1.0, 0.0, 0.2]), 3)
    pos = p.pos.clone()
    pos[0] = torch.tensor([1.0, 0.4, 0.3])
    pos[3] = torch.tensor([2.0, 1.0, 0.0])
    q = B.requantize(B.Planes(pos, p.neg, p.scale, 3), maxbit=8)
    assert q.nbits == 4
    assert float(q.scale) == pytest.approx(15 / 7)
    assert q.pos.tolist() == [[0, 1, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0], [1, 0, 1, 0]]
    assert q.neg.tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    w = q.scale * B.planes_to_unit(q.pos, q.neg, B.place_values(4))
    assert torch.allclose(w, torch.tensor([5 / 7, -1.0, 0.0, 10 / 7]))


def test_requantize_precision_increase_example_of_section_3_1():
    """4-bit planes [2,0,0,0]: u = 16/15 -> N = 5, s' = s 31/15, value s 16/15 (spec §3.1)."""
    pos = torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 1]])
    q = B.requantize(B.Planes(pos, torch.zeros_like(pos), torch.tensor(0.5), 4), maxbit=8)
    assert q.nbits == 5 and float(q.scale) == pytest.approx(0.5 * 31 / 15)
    assert float(q.scale * B.planes_to_unit(q.pos, q.neg, B.place_values(5))[0]) == pytest.approx(0.5 * 16 / 15)


def test_requantize_saturates_at_maxbit():
    pos = torch.tensor([[2.0, 0, 0]])
    q = B.requantize(B.Planes(pos, torch.zeros_like(pos), torch.tensor(1.0), 3), maxbit=3)
    assert q.nbits == 3 and q.pos.tolist() == [[1, 1, 1]]


def test_prune_drops_zero_msb_and_lsb_exactly():
    """6-bit layer, empty MSB and LSB -> N = 4, s' = s 2 15/63, weights unchanged (spec §3.2, B.3)."""
    ints = torch.tensor([0b011110, 0b000010, 0b010100, 0])
    pos = B.int_to_planes(ints, 6)
    neg = B.int_to_planes(torch.tensor([0, 0b001000, 0, 0]), 6)
    before = 0.7 * B.planes_to_unit(pos, neg, B.place_values(6))
    q = B.prune(B.Planes(pos, neg, torch.tensor(0.7), 6))
    assert q.nbits == 4 and float(q.scale) == pytest.approx(0.7 * 2 * 15 / 63)
    assert torch.allclose(q.scale * B.planes_to_unit(q.pos, q.neg, B.place_values(4)), before)


def test_prune_msb_fold_with_threshold_appendix_b3():
    """4-bit, MSB set on 1 of 2500 weights (0.04 %) with thre = 1 % -> fold: s' = s 7/15, weight -> [1,1,1]."""
    ints = torch.full((2500,), 0b0101)
    ints[0] = 0b1000
    pos = B.int_to_planes(ints, 4)
    q = B.prune(B.Planes(pos, torch.zeros_like(pos), torch.tensor(1.0), 4), threshold=1.0)
    assert q.nbits == 3 and float(q.scale) == pytest.approx(7 / 15)
    assert q.pos[0].tolist() == [1, 1, 1] and q.pos[1].tolist() == [1, 0, 1]


def test_prune_keeps_middle_zero_planes_and_stops_at_one_bit():
    pos = B.int_to_planes(torch.tensor([0b101, 0b100]), 3)
    assert B.prune(B.Planes(pos, torch.zeros_like(pos), torch.tensor(1.0), 3)).nbits == 3
    zero = torch.zeros(4, 5)
    q = B.prune(B.Planes(zero, zero, torch.tensor(1.0), 5))
    assert q.nbits == 1 and float(q.scale) == pytest.approx(1 / 31)


def _step_and_values(q: B.Planes) -> tuple[float, torch.Tensor]:
    step = float(q.scale) / (2**q.nbits - 1)
    return step, q.scale * B.planes_to_unit(q.pos.double(), q.neg.double(), B.place_values(q.nbits, torch.float64))


def test_msb_drop_keeps_the_step_and_lsb_drop_doubles_it():
    """An empty MSB leaves s/(2^N-1) unchanged; an empty LSB doubles it; the weights never change."""
    s = torch.tensor(0.9, dtype=torch.float64)
    msb_empty = B.Planes(
        B.int_to_planes(torch.tensor([0b0111, 0b0010]), 4).double(),
        B.int_to_planes(torch.tensor([0, 0b0101]), 4).double(),
        s,
        4,
    )
    step0, w0 = _step_and_values(msb_empty)
    q = B.prune(msb_empty)
    step1, w1 = _step_and_values(q)
    assert q.nbits == 3 and step1 == pytest.approx(step0) and torch.allclose(w1, w0)
    lsb_empty = B.Planes(
        B.int_to_planes(torch.tensor([0b1110, 0b0010]), 4).double(), torch.zeros(2, 4, dtype=torch.float64), s, 4
    )
    step0, w0 = _step_and_values(lsb_empty)
    q = B.prune(lsb_empty)
    step1, w1 = _step_and_values(q)
    assert q.nbits == 3 and step1 == pytest.approx(2 * step0) and torch.allclose(w1, w0)
