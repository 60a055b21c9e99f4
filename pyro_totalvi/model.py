r"""totalVI as a Pyro model and guide: Eqs. (1)-(14) of the totalVI user guide, one block each.

Shapes: ``B`` cells in the minibatch, ``G`` genes, ``T`` proteins, ``K`` batches, ``d`` latent
dimensions. The cell plate is ``dim=-2`` so that genes and proteins can be plates (``dim=-1``)
nested inside it; the per-cell vector ``z`` therefore carries a singleton dimension, ``(B, 1, d)``.

:meth:`TotalVIModule.model` reads top to bottom like the generative process and names every
sample site; what each site *is* comes from a short method, a **block**, that returns a
distribution or tensors. To change one part of the model, override one block in a subclass (and
hand the class to ``TOTALVI(adata, module_class=...)``); no copy of ``model`` is needed.

==========================  ==========  ============================================  ==============
block                       eq.         returns                                       shape
==========================  ==========  ============================================  ==============
``latent_prior(s)``         (1)         p(z_n) = Normal(0, I)                         ``(B, 1 | d)``
``decode(z, cov)``          (2)-(4),    ``rho`` (simplex), ``alpha >= 1``,            ``(B, G)``,
                            (6)-(8)     ``pi_logits`` (logit of P(background))        ``(B, T)`` x 2
``library_prior(s)``        (5)         LogNormal(l_mu^T s, l_sigma2^T s)             ``(B, 1)``
``rna_likelihood(l, rho)``  (10)        NB(l rho, theta)                              ``(B, G)``
``background_prior(s)``     (11)        LogNormal(c^T s, d^T s)                       ``(B, T)``
``protein_likelihood(...)`` (12)-(14)   NB(v beta + (1-v) beta alpha, phi); ``v=None``:  ``(B, T)``
                                        the mixture with v summed out
==========================  ==========  ============================================  ==============

Guide blocks: ``latent_posterior(...)`` gives q(z | x, y, s) (and q(l | x, y, s) for a latent
library, from :meth:`TotalVIModule.encode`), ``background_posterior(z, cov)`` gives
q(beta | z, s). Non-model terms (penalties that shape training but are not part of p) are added
with :func:`penalty`; the one trace scorer (:mod:`pyro_totalvi.scoring`) leaves them out of every
reported likelihood.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from .distributions import NegativeBinomial, NegativeBinomialMixture
from .nn import BackgroundEncoder, Decoder, Encoder

__all__ = ["TotalVIModule", "penalty", "PENALTY"]

#: ``infer`` key that marks a site as a non-model factor (see :func:`penalty`).
PENALTY = "penalty"


def penalty(name: str, log_factor: torch.Tensor) -> None:
    """Add ``log_factor`` to the training objective as a *non-model* term.

    Like ``pyro.factor``, but the site carries ``infer={"penalty": True}``: SVI optimises it,
    while :func:`pyro_totalvi.scoring.trace_terms` (and so every reported ELBO, reconstruction
    error and marginal likelihood) leaves it out.
    """
    unit = dist.Unit(log_factor)
    pyro.sample(name, unit, obs=unit.sample(), infer={"is_auxiliary": True, PENALTY: True})


class TotalVIModule(nn.Module):
    """Generative model p(x, y, z, l, beta, v | s) and amortised guide q(z, l, beta | x, y, s).

    Parameters
    ----------
    n_genes, n_proteins, n_batches
        G, T and K.
    n_latent
        Dimension d of z.
    n_covariates
        Width of extra covariates given to the networks besides the one-hot batch: one-hot
        categorical and raw continuous covariates, passed as ``covariates`` ``(B, p)``; the
        networks see ``s ⊕ covariates`` in every layer.
    encode_covariates
        Whether the encoder q(z, l | x, y, ...) sees the one-hot batch and the covariates. With
        ``False`` it sees only ``(x, y)`` — batch *and* covariates are dropped, as scvi-tools'
        ``encode_covariates=False`` does; the generative networks and q(beta | z, s) always see
        them.
    protein_mixture
        ``"marginal"``: ``v`` summed out analytically into a negative-binomial mixture (train with
        ``Trace_ELBO``). ``"enumerate"``: ``v`` is a sample site enumerated in parallel and summed
        out by ``TraceEnum_ELBO(max_plate_nesting=2)``. Both define the same ELBO.
    use_observed_lib_size
        Use ``l = sum_g x_g`` (passed as ``log_library``) instead of the latent ``l`` of Eq. (5).
    library_log_means, library_log_vars
        Per-batch mean and variance of log library size (Eq. 5 prior), shape ``(K,)``.
    background_prior_mean, background_prior_scale
        Initial ``c`` and ``exp(d)`` of Eq. (11), shape ``(T, K)``; random when ``None``.
    n_hidden, n_layers_encoder, dropout_rate_encoder, dropout_rate_decoder
        Network sizes, defaults as scvi-tools' TOTALVI.
    protein_warmup
        During KL warm-up, weight the protein likelihood (``v`` and ``y``) by the warm-up factor
        as well, as scvi-tools 1.4 does: early epochs then shape z and the decoders by the RNA
        first. At the end of warm-up (and in every reported ELBO) the weight is 1 either way.
    background_preference
        Weight ``w`` of a non-model factor ``w log pi`` per cell and protein (see
        :meth:`background_penalty`); 0 removes it. Left out of every reported likelihood.
    n_panels
        Number of protein panels (scvi-tools' ``panel_key``): the background prior of
        Eq. (11) then has one ``c_t, d_t`` per panel, and :meth:`model` takes the one-hot
        ``panel (B, P)``, instead of one per batch. Default ``None``: the batches are the panels.
    use_size_factor_key
        The library ``l_n`` is a given size factor (scvi-tools' ``size_factor_key``, passed as
        ``log_library``), not the total counts: ``rho`` is then the softplus of the decoder's
        output instead of its softmax, so it is non-negative but not on the simplex (as
        scvi-tools' ``DecoderTOTALVI(scale_activation="softplus")``). Implies an observed library.
    """

    def __init__(
        self,
        n_genes: int,
        n_proteins: int,
        n_batches: int = 1,
        n_latent: int = 20,
        n_covariates: int = 0,
        encode_covariates: bool = True,
        protein_mixture: Literal["marginal", "enumerate"] = "marginal",
        use_observed_lib_size: bool = True,
        library_log_means: torch.Tensor | None = None,
        library_log_vars: torch.Tensor | None = None,
        background_prior_mean: torch.Tensor | None = None,
        background_prior_scale: torch.Tensor | None = None,
        n_hidden: int = 256,
        n_layers_encoder: int = 2,
        dropout_rate_encoder: float = 0.2,
        dropout_rate_decoder: float = 0.2,
        background_preference: float = 1e-3,
        protein_warmup: bool = True,
        n_panels: int | None = None,
        use_size_factor_key: bool = False,
    ):
        super().__init__()
        if protein_mixture not in ("marginal", "enumerate"):
            raise ValueError(f"protein_mixture must be 'marginal' or 'enumerate', got {protein_mixture!r}")
        self.n_genes, self.n_proteins, self.n_batches = n_genes, n_proteins, n_batches
        self.n_latent = n_latent
        self.n_covariates = n_covariates
        self.encode_covariates = encode_covariates
        self.protein_mixture = protein_mixture
        self.use_size_factor_key = use_size_factor_key
        self.use_observed_lib_size = use_observed_lib_size or use_size_factor_key
        self.n_panels = n_batches if n_panels is None else n_panels
        self.background_preference = background_preference
        self.protein_warmup = protein_warmup
        n_cov = n_batches + n_covariates

        self.encoder = Encoder(n_genes, n_proteins, n_latent, n_cov if encode_covariates else 0,
                               n_hidden, n_layers_encoder, dropout_rate_encoder,
                               latent_library=not self.use_observed_lib_size)
        self.decoder = Decoder(n_latent, n_genes, n_proteins, n_cov, n_hidden, dropout_rate_decoder,
                               rho_activation="softplus" if use_size_factor_key else "softmax")
        self.background_encoder = BackgroundEncoder(n_latent, n_proteins, n_cov, n_hidden,
                                                    dropout_rate_decoder)

        # theta_g and phi_t, the global inverse dispersions, kept on the log scale (scvi-tools' init).
        self.log_theta = nn.Parameter(torch.randn(n_genes))
        self.log_phi = nn.Parameter(2 * torch.rand(n_proteins))
        # c_t and d_t of Eq. (11): learned, one value per protein and batch; d on the log scale.
        if background_prior_mean is None:
            background_prior_mean = torch.randn(n_proteins, self.n_panels)
            background_prior_scale = torch.rand(n_proteins, self.n_panels).clamp_min(1e-2)
        self.background_c = nn.Parameter(torch.as_tensor(background_prior_mean, dtype=torch.float32))
        self.background_log_d = nn.Parameter(
            torch.as_tensor(background_prior_scale, dtype=torch.float32).log()
        )
        # l_mu and l_sigma^2 of Eq. (5) are data statistics, not learned: buffers (none when a
        # size factor is the library: it is never latent then, as in scvi-tools).
        zeros = torch.zeros(n_batches)
        if not use_size_factor_key:
            self.register_buffer("library_log_means", torch.as_tensor(
                zeros if library_log_means is None else library_log_means, dtype=torch.float32))
            self.register_buffer("library_log_vars", torch.as_tensor(
                zeros + 1 if library_log_vars is None else library_log_vars,
                dtype=torch.float32))

    # ------------------------------------------------------------------------------------------
    #: Register the networks with Pyro's param store on every call, so that ``pyro.infer.SVI``
    #: with a ``pyro.optim`` optimiser sees them. :func:`pyro_totalvi.train.train` optimises
    #: ``module.parameters()`` directly and switches this off: it was 7% of a training step.
    register_with_pyro: bool = True

    def _register_params(self) -> None:
        if self.register_with_pyro:
            pyro.module("totalvi", self)

    @contextlib.contextmanager
    def fast_calls(self):
        """Skip per-call work that loops over many minibatches do not need; restored on exit.

        Pyro's argument checks of every distribution at every call cost more than the NB
        likelihood (the tests check shapes once, with validation on), and registering the networks
        with the param store is unnecessary when a torch optimiser holds ``self.parameters()``.
        """
        self.register_with_pyro = False
        try:
            with pyro.validation_enabled(False):
                yield
        finally:
            self.register_with_pyro = True

    @contextlib.contextmanager
    def v_summed_out(self):
        """Use the analytic mixture for ``v`` (same model, no enumeration dimension)."""
        saved, self.protein_mixture = self.protein_mixture, "marginal"
        try:
            yield
        finally:
            self.protein_mixture = saved

    def network_input(self, s: torch.Tensor, covariates: torch.Tensor | None) -> torch.Tensor:
        """``s ⊕ covariates`` ``(B, K + p)``: what the networks see besides ``z`` or the counts."""
        if self.n_covariates:
            if covariates is None or covariates.shape[-1] != self.n_covariates:
                raise ValueError(
                    f"this module was built with n_covariates={self.n_covariates}; pass "
                    f"covariates of shape (cells, {self.n_covariates}), got "
                    f"{None if covariates is None else tuple(covariates.shape)}")
            return torch.cat([s, covariates.to(s.dtype)], dim=-1)
        if covariates is not None and covariates.shape[-1]:
            raise ValueError(f"covariates of width {covariates.shape[-1]} given to a module built "
                             "with n_covariates=0")
        return s

    # -- plates ----------------------------------------------------------------------------------
    def cells_plate(self, n_cells: int, idx: torch.Tensor | None, n_obs: int | None):
        """The cell plate (``dim=-2``); with ``idx`` among ``n_obs`` cells it scales the
        minibatch by ``n_obs / B``, so the ELBO estimate is unbiased for the full data."""
        return pyro.plate("cells", n_obs or n_cells, subsample=idx, dim=-2)

    def genes_plate(self):
        return pyro.plate("genes", self.n_genes, dim=-1)

    @contextlib.contextmanager
    def proteins_plate(self, protein_mask: torch.Tensor | None):
        """The protein plate; entries where ``protein_mask`` is ``False`` (not measured) add
        nothing to any site inside it."""
        with pyro.plate("proteins", self.n_proteins, dim=-1), poutine.mask(
                mask=True if protein_mask is None else protein_mask):
            yield

    # -- model blocks ------------------------------------------------------------------------------
    def latent_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (1): p(z_n) = Normal(0, I), event shape ``(d,)`` (on the data's device)."""
        return dist.Normal(s.new_zeros(self.n_latent), 1.0).to_event(1)

    def decode(self, z: torch.Tensor, cov: torch.Tensor):
        """Eqs. (2)-(4), (6)-(8): ``rho (B, G)``, ``alpha (B, T) >= 1`` and the *logits* of
        ``pi (B, T)`` from ``z (B, d)`` and ``cov`` = ``s ⊕ covariates``. ``rho`` is on the
        simplex, or only non-negative with ``use_size_factor_key`` (softplus)."""
        return self.decoder(z, cov)

    def library_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (5): LogNormal(l_mu^T s_n, l_sigma2^T s_n), ``(B, 1)``; used when the library is
        latent (``use_observed_lib_size=False``)."""
        l_mu = (s @ self.library_log_means).unsqueeze(-1)
        l_sigma = (s @ self.library_log_vars).sqrt().unsqueeze(-1)
        return dist.LogNormal(l_mu, l_sigma)

    def rna_likelihood(self, library: torch.Tensor, rho: torch.Tensor) -> dist.Distribution:
        """Eq. (10): NB(l_n rho_ng, theta_g), ``(B, G)``."""
        return NegativeBinomial(library * rho, self.log_theta.exp())

    def background_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (11): LogNormal(c_t^T s_n, d_t^T s_n), ``(B, T)`` (``d`` kept on the log scale);
        ``s`` is the one-hot panel when the module has panels (``n_panels``)."""
        return dist.LogNormal(s @ self.background_c.T, (s @ self.background_log_d.T).exp())

    def protein_likelihood(self, beta: torch.Tensor, alpha: torch.Tensor,
                           pi_logits: torch.Tensor, v: torch.Tensor | None = None
                           ) -> dist.Distribution:
        """Eq. (14): NB(v beta + (1 - v) beta alpha, phi_t), ``(B, T)``; ``v = None`` gives
        Eqs. (12)-(14) with v summed out, pi NB(beta, phi) + (1 - pi) NB(beta alpha, phi)."""
        phi = self.log_phi.exp()
        if v is None:
            return NegativeBinomialMixture(beta, beta * alpha, phi, pi_logits)
        return NegativeBinomial(v * beta + (1 - v) * beta * alpha, phi)

    def background_penalty(self, pi_logits: torch.Tensor) -> None:
        """Non-model factor ``w log pi_nt`` (``w`` = ``background_preference``).

        Where counts cannot tell background from foreground (a protein with almost no counts,
        such as an isotype control) the likelihood is flat in ``pi``, and this tips it to
        background; it is negligible wherever the data speak. Not part of Eqs. (1)-(14):
        reported likelihoods leave it out (:func:`penalty`).
        """
        if self.background_preference:
            penalty("background_preference", self.background_preference * F.logsigmoid(pi_logits))

    # ------------------------------------------------------------------------------------------
    def model(
        self,
        x: torch.Tensor | None,
        y: torch.Tensor | None,
        s: torch.Tensor,
        log_library: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
        protein_mask: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        n_obs: int | None = None,
        kl_weight: float = 1.0,
        decode_as: torch.Tensor | None = None,
        panel: torch.Tensor | None = None,
    ):
        """p(x, y, z, l, beta, v | s).

        Parameters
        ----------
        x, y
            RNA ``(B, G)`` and protein ``(B, T)`` counts (``None`` to sample them).
        s
            One-hot batch ``(B, K)``.
        log_library
            ``(B, 1)`` log total RNA counts, required when the library is observed.
        covariates
            Extra network covariates ``(B, p)``.
        protein_mask
            Boolean ``(B, T)``: ``False`` where a protein was not measured; such entries add nothing
            to the likelihood.
        idx, n_obs
            Indices of the minibatch among ``n_obs`` cells (see :meth:`cells_plate`).
        kl_weight
            KL warm-up factor on the local latent sites ``z`` and ``beta`` (and, with
            ``protein_warmup``, on the protein likelihood).
        decode_as
            One-hot batch ``(B, K)`` that the generative networks and the background prior see
            instead of ``s``: counterfactual expression "as if measured in that batch"
            (``transform_batch``). The encoder always sees the cell's own ``s``.
        panel
            One-hot protein panel ``(B, P)`` of a module with ``n_panels``: it, not the batch,
            indexes the background prior (as scvi-tools' ``panel_key``).

        Besides the sample sites, ``rho``, ``alpha`` and ``pi`` are recorded as
        ``pyro.deterministic`` sites so that ``pyro.infer.Predictive`` returns them.
        """
        self._register_params()
        s_gen = s if decode_as is None else decode_as
        cov = self.network_input(s_gen, covariates)  # transform_batch swaps s, not covariates
        with self.cells_plate(s.shape[0], idx, n_obs):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", self.latent_prior(s)).squeeze(-2)  # (1)
            rho, alpha, pi_logits = self.decode(z, cov)  # (2)-(4), (6)-(8)
            if self.use_observed_lib_size:
                library = log_library.exp()  # l_n observed: total RNA counts
            else:
                library = pyro.sample("l", self.library_prior(s))  # (5)
            with self.genes_plate():
                pyro.deterministic("rho", rho)
                pyro.sample("x", self.rna_likelihood(library, rho), obs=x)  # (10)
            with self.proteins_plate(protein_mask):
                pyro.deterministic("alpha", alpha)
                pyro.deterministic("pi", torch.sigmoid(pi_logits))
                with poutine.scale(scale=kl_weight):
                    beta = pyro.sample("beta", self.background_prior(
                        s_gen if panel is None else panel))  # (11)
                    self.background_penalty(pi_logits)  # not in the model; warmed up as scvi-tools
                with poutine.scale(scale=kl_weight if self.protein_warmup else 1.0):
                    v = None  # "marginal": summed out analytically inside the likelihood
                    if self.protein_mixture == "enumerate":  # v_nt = 1: background only
                        v = pyro.sample("v", dist.Bernoulli(logits=pi_logits),
                                        infer={"enumerate": "parallel"})  # (12)
                    pyro.sample("y", self.protein_likelihood(beta, alpha, pi_logits, v),
                                obs=y)  # (14)

    # -- guide blocks ------------------------------------------------------------------------------
    def encode(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        s: torch.Tensor,
        log_library: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
        protein_mask: torch.Tensor | None = None,
    ):
        """Parameters of q(z | x, y, s) and q(l | x, y, s): ``(z_loc, z_scale, l_loc, l_scale)``.

        Takes :meth:`model`'s first arguments (``*minibatch.args()``); unmeasured proteins are
        zeroed first, so their values never inform q. ``log_library`` is unused (accepted so that
        ``encode(*mb.args())`` works); ``l_loc, l_scale`` are ``None`` for an observed library.
        """
        if protein_mask is not None:
            y = y * protein_mask  # an unmeasured protein's value must not inform q(z) either
        cov = self.network_input(s, covariates) if self.encode_covariates else None
        return self.encoder(x, y, cov)

    def latent_posterior(self, *args) -> tuple[dist.Distribution, dist.Distribution | None]:
        """q(z | x, y, s) with event shape ``(d,)`` on ``(B, 1)``, and q(l | x, y, s) ``(B, 1)``
        (``None`` for an observed library); takes :meth:`encode`'s arguments."""
        z_loc, z_scale, l_loc, l_scale = self.encode(*args)
        q_z = dist.Normal(z_loc.unsqueeze(-2), z_scale.unsqueeze(-2)).to_event(1)
        return q_z, None if l_loc is None else dist.LogNormal(l_loc, l_scale)

    def background_posterior(self, z: torch.Tensor, cov: torch.Tensor) -> dist.Distribution:
        """q(beta | z, s) = LogNormal ``(B, T)`` from ``z (B, d)`` and ``s ⊕ covariates``."""
        return dist.LogNormal(*self.background_encoder(z, cov))

    def guide(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        s: torch.Tensor,
        log_library: torch.Tensor | None = None,
        covariates: torch.Tensor | None = None,
        protein_mask: torch.Tensor | None = None,
        idx: torch.Tensor | None = None,
        n_obs: int | None = None,
        kl_weight: float = 1.0,
        decode_as: torch.Tensor | None = None,
        panel: torch.Tensor | None = None,
    ):
        """q(beta | z, s) q(z | x, y, s) q(l | x, y, s); same arguments as :meth:`model`."""
        self._register_params()
        cov_gen = self.network_input(s if decode_as is None else decode_as, covariates)
        q_z, q_l = self.latent_posterior(x, y, s, log_library, covariates, protein_mask)
        with self.cells_plate(s.shape[0], idx, n_obs):
            with poutine.scale(scale=kl_weight):
                z = pyro.sample("z", q_z).squeeze(-2)
            if q_l is not None:
                pyro.sample("l", q_l)
            with self.proteins_plate(protein_mask), poutine.scale(scale=kl_weight):
                pyro.sample("beta", self.background_posterior(z, cov_gen))
