"""Straight-through estimators: forward rounds as the spec says, backward is the identity."""

import torch

from bsq.quant.ste import levels, quantize_activation_ste, quantize_levels_ste


def test_levels_forward_clips_and_rounds_half_to_even():
    """I = sign(u_c) round(|u_c| (2^N-1)); 2.5/7 -> 2 and 3.5/7 -> 4 (half-to-even, spec App. B.1)."""
    u = torch.tensor([2.5 / 7, 3.5 / 7, -1.7, 1.3, 0.0, -0.2])
    assert quantize_levels_ste(u, 3).tolist() == [2.0, 4.0, -7.0, 7.0, 0.0, -1.0]


def test_levels_backward_is_identity_after_scaling_by_levels():
    """dQ/du = 1 with Q = I / (2^N-1), including clipped entries (no masking, spec P7)."""
    u = torch.tensor([0.3, -1.7, 1.5, 0.0], requires_grad=True)
    g = torch.tensor([1.0, 2.0, -3.0, 4.0])
    (quantize_levels_ste(u, 4) / levels(4)).backward(g)
    assert torch.equal(u.grad, g)


def test_activation_forward_uses_batch_max():
    """x -> S round(x k / S) / k with S = max|x| over the whole tensor (spec §4.1)."""
    x = torch.tensor([[0.0, 1.1], [2.9, 6.0]])
    # k = 3 at 2 bits, S = 6: levels at 0, 2, 4, 6
    assert quantize_activation_ste(x, 2).tolist() == [[0.0, 2.0], [2.0, 6.0]]


def test_activation_all_zero_input_stays_zero():
    x = torch.zeros(3, 4)
    assert torch.equal(quantize_activation_ste(x, 4), x)


def test_activation_backward_is_identity():
    x = torch.rand(5, requires_grad=True)
    g = torch.randn(5)
    quantize_activation_ste(x, 4).backward(g)
    assert torch.equal(x.grad, g)
