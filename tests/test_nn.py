"""The networks (``pyro_totalvi/nn.py``): what a hand-made block must do exactly as torch's."""

import torch

from pyro_totalvi.nn import FCLayers
from pyro_totalvi.rng import rng_scope


def _identity_block(width: int, dropout: float) -> FCLayers:
    """One Linear -> ReLU -> Dropout block whose Linear is the identity (no BatchNorm)."""
    block = FCLayers(width, width, n_layers=1, n_hidden=width, dropout=dropout, batch_norm=False)
    with torch.no_grad():
        block.linears[0].weight.copy_(torch.eye(width))
        block.linears[0].bias.zero_()
    return block


def test_dropout_keeps_exactly_the_draws_at_or_above_p_and_rescales_them():
    """The in-place mask equals ``nn.Dropout``'s definition on the same uniform draws:
    ``relu(h) * 1[u >= p] / (1 - p)``, with ``u`` the block's ``rand_like`` draw; eval mode
    drops nothing. A mask with the comparison flipped, a missing rescaling, or a draw that is
    not the generator's next one fails."""
    p, h = 0.2, torch.randn(256, 64).abs() + 0.1
    block = _identity_block(64, p).train()
    with rng_scope(3):
        out = block(h)
    with rng_scope(3):
        u = torch.rand_like(h)
    expected = h * ((u >= p).to(h.dtype) * (1 / (1 - p)))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    dropped = (out == 0).float().mean().item()
    sd = (p * (1 - p) / h.numel()) ** 0.5
    assert abs(dropped - p) < 4 * sd  # the fraction dropped is p
    torch.testing.assert_close(block.eval()(h), h, rtol=0, atol=0)


def test_dropout_gradient_flows_through_kept_units_only():
    """d out / d h is the scaled mask: 1 / (1 - p) where kept, 0 where dropped."""
    p, h = 0.5, (torch.rand(128, 32) + 0.1).requires_grad_()
    block = _identity_block(32, p).train()
    with rng_scope(5):
        out = block(h)
    out.sum().backward()
    kept = out.detach() != 0
    torch.testing.assert_close(h.grad, kept.to(h.dtype) / (1 - p), rtol=0, atol=0)
