"""Neural networks of totalVI: the amortised encoders and the decoders f_rho, g_alpha, h_pi.

The sizes follow scvi-tools' ``EncoderTOTALVI`` / ``DecoderTOTALVI`` defaults so that results can
be compared one to one; one deliberate difference: for a latent library, q(l | x, y, s) reads the
z-encoder's hidden layer, where scvi-tools gives it a second network on the input (it matters only
with ``use_observed_lib_size=False``; kept so that saved models load). Nothing here is
probabilistic: ``model.py`` turns the outputs into distributions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["FCLayers", "Encoder", "Decoder", "BackgroundEncoder", "CountEncoder"]


class FCLayers(nn.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout blocks; covariates join the input of every block.

    Injecting the covariates (one-hot batch, other covariates) into every layer, rather than only the
    first, is what lets deep decoders keep batch information (as scvi-tools' ``FCLayers``).

    Parameters
    ----------
    n_in, n_out
        Input and output widths.
    n_cov
        Width of the covariate vector concatenated to every layer's input.
    n_layers, n_hidden
        Depth and width of the hidden layers.
    dropout, batch_norm, activation
        Per-block options; ``activation=False`` makes a single affine map.
    """

    def __init__(
        self,
        n_in: int,
        n_out: int,
        n_cov: int = 0,
        n_layers: int = 1,
        n_hidden: int = 256,
        dropout: float = 0.0,
        batch_norm: bool = True,
        activation: bool = True,
    ):
        super().__init__()
        #: width of the covariates appended to every layer's input: the last ``n_cov`` input
        #: columns of each ``Linear`` (what reference mapping pads, :mod:`pyro_totalvi.query`)
        self.n_cov = n_cov
        widths = [n_in] + [n_hidden] * (n_layers - 1) + [n_out]
        self.linears = nn.ModuleList(
            nn.Linear(a + n_cov, b) for a, b in zip(widths[:-1], widths[1:])
        )
        # momentum/eps as scvi-tools: a slow running average suits noisy minibatches of counts.
        self.norms = nn.ModuleList(
            nn.BatchNorm1d(b, momentum=0.01, eps=1e-3) if batch_norm else nn.Identity()
            for b in widths[1:]
        )
        self.activation = activation
        self.dropout = dropout

    def forward(self, h: torch.Tensor, cov: torch.Tensor | None = None) -> torch.Tensor:
        lead = h.shape[:-1]
        # BatchNorm1d wants (N, C): fold any leading sample dimensions into N.
        h = h.reshape(-1, h.shape[-1])
        if cov is not None:
            cov = cov.expand(*lead, cov.shape[-1]).reshape(-1, cov.shape[-1])
        for linear, norm in zip(self.linears, self.norms):
            if cov is not None:
                h = torch.cat([h, cov], dim=-1)
            h = linear(h)
            if self.activation:
                h = F.relu(norm(h))
                if self.training and self.dropout > 0:
                    # Same as nn.Dropout, but a uniform draw is ~2x cheaper on CPU than the
                    # bernoulli_ kernel nn.Dropout uses; dropout masks were 10% of a step. The
                    # scaled mask is made outside autograd: one multiplication to differentiate.
                    # Compared in place in the draw's float tensor: a bool mask converted to
                    # float cost ~75 us per 256 x 256 mask on CPU, the in-place ops ~20 us.
                    keep = torch.rand_like(h).ge_(self.dropout)
                    h = h * keep.mul_(1 / (1 - self.dropout))
        return h.reshape(*lead, h.shape[-1])


class Encoder(nn.Module):
    """q(z | x, y, s) and, for a latent library, q(l | x, y, s).

    Input is ``log1p(x) ⊕ log1p(y)``, or with ``scale_input`` (as scvi-tools 1.4)
    ``log1p(x / (1 + mean_g x)) ⊕ log1p(y / (1 + mean_t y))``: each cell's counts divided by 1 +
    their mean first, which keeps the input of a cell without proteins (a masked, RNA-only
    batch) closer to what the network saw. Covariates ``s`` are injected in every hidden layer.
    The library head reads the shared hidden layer (scvi-tools: a separate network on the
    input). Returns ``(z_loc, z_scale, l_loc, l_scale)``; the last two are ``None`` when the
    library is observed, so no compute is spent on an unused head.
    """

    def __init__(
        self,
        n_genes: int,
        n_proteins: int,
        n_latent: int,
        n_cov: int,
        n_hidden: int = 256,
        n_layers: int = 2,
        dropout: float = 0.2,
        latent_library: bool = False,
        scale_input: bool = False,
    ):
        super().__init__()
        self.scale_input = scale_input
        self.body = FCLayers(
            n_genes + n_proteins, n_hidden, n_cov, n_layers, n_hidden, dropout=dropout
        )
        self.z_loc = nn.Linear(n_hidden, n_latent)
        self.z_log_var = nn.Linear(n_hidden, n_latent)
        self.latent_library = latent_library
        if latent_library:
            self.l_body = FCLayers(n_hidden, n_hidden, n_cov, 1, n_hidden, dropout=dropout)
            self.l_loc = nn.Linear(n_hidden, 1)
            self.l_log_var = nn.Linear(n_hidden, 1)

    def forward(self, x, y, cov):
        if self.scale_input:
            x = x / (1 + x.mean(-1, keepdim=True))
            y = y / (1 + y.mean(-1, keepdim=True))
        h = self.body(torch.cat([torch.log1p(x), torch.log1p(y)], dim=-1), cov)
        # exp + 1e-4 (scvi-tools' var_eps) keeps the posterior scale away from 0.
        z_scale = (self.z_log_var(h).exp() + 1e-4).sqrt()
        if not self.latent_library:
            return self.z_loc(h), z_scale, None, None
        hl = self.l_body(h, cov)
        # The clamp keeps exp(log l) finite in early training (scvi-tools clamps at 15 too).
        l_loc = self.l_loc(hl).clamp(max=15.0)
        return self.z_loc(h), z_scale, l_loc, (self.l_log_var(hl).exp() + 1e-4).sqrt()


class _Head(nn.Module):
    """One hidden layer on (z, s), then an affine map on (hidden ⊕ z, s): scvi-tools' decoder block."""

    def __init__(self, n_latent, n_out, n_cov, n_hidden, dropout, activation_out=False):
        super().__init__()
        self.hidden = FCLayers(n_latent, n_hidden, n_cov, 1, n_hidden, dropout=dropout)
        self.out = FCLayers(n_hidden + n_latent, n_out, n_cov, batch_norm=False, activation=False)
        self.activation_out = activation_out

    def forward(self, z, cov):
        out = self.out(torch.cat([self.hidden(z, cov), z], dim=-1), cov)
        return F.relu(out) if self.activation_out else out


class Decoder(nn.Module):
    """The generative networks f_rho (Eq. 6), g_alpha (Eq. 7) and h_pi (Eq. 8).

    Returns ``rho`` (softmax over genes; ``rho_activation="softplus"``: non-negative, not
    normalised, for a library given as a size factor), ``alpha >= 1`` and the *logits* of ``pi``.
    """

    def __init__(self, n_latent, n_genes, n_proteins, n_cov, n_hidden=256, dropout=0.0,
                 rho_activation: str = "softmax"):
        super().__init__()
        if rho_activation not in ("softmax", "softplus"):
            raise ValueError(f"rho_activation must be 'softmax' or 'softplus', got "
                             f"{rho_activation!r}")
        self.rho_activation = rho_activation
        self.rho = _Head(n_latent, n_genes, n_cov, n_hidden, dropout)
        self.alpha = _Head(n_latent, n_proteins, n_cov, n_hidden, dropout, activation_out=True)
        self.pi = _Head(n_latent, n_proteins, n_cov, n_hidden, dropout)

    def forward(self, z, cov):
        out = self.rho(z, cov)
        rho = torch.softmax(out, dim=-1) if self.rho_activation == "softmax" else F.softplus(out)
        alpha = 1.0 + 1e-8 + self.alpha(z, cov)  # ReLU + 1: the foreground is never below background
        return rho, alpha, self.pi(z, cov)


class BackgroundEncoder(nn.Module):
    """q(beta | z, s): location and scale of log beta, one per protein."""

    def __init__(self, n_latent, n_proteins, n_cov, n_hidden=256, dropout=0.0):
        super().__init__()
        self.hidden = FCLayers(n_latent, n_hidden, n_cov, 1, n_hidden, dropout=dropout)
        self.out = FCLayers(n_hidden + n_latent, 2 * n_proteins, n_cov, batch_norm=False,
                            activation=False)

    def forward(self, z, cov):
        loc, raw_scale = self.out(torch.cat([self.hidden(z, cov), z], dim=-1), cov).chunk(2, -1)
        # softplus (not exp) as scvi-tools >= 1.2: large raw outputs do not explode the scale.
        return loc, F.softplus(raw_scale) + 1e-8


class CountEncoder(nn.Module):
    """Location and scale ``(..., n_out)`` of a Normal from ``log1p`` counts and covariates.

    One hidden layer; the guide of the per-cell background shift (``n_out = 1``, from a cell's
    protein counts) and of the empty droplets' backgrounds (``n_out = T``, from a droplet's).
    """

    def __init__(self, n_in: int, n_out: int, n_cov: int, n_hidden: int = 64):
        super().__init__()
        self.hidden = FCLayers(n_in, n_hidden, n_cov, 1, n_hidden)
        self.out = nn.Linear(n_hidden, 2 * n_out)

    def forward(self, counts: torch.Tensor, cov: torch.Tensor | None):
        loc, raw_scale = self.out(self.hidden(torch.log1p(counts), cov)).chunk(2, -1)
        return loc, F.softplus(raw_scale) + 1e-4
