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
``decode(z, cov)``          (2)-(4),    ``rho`` (simplex), ``alpha >= m``,            ``(B, G)``,
                            (6)-(8)     ``pi_logits`` (logit of P(background))        ``(B, T)`` x 2
``library_prior(s)``        (5)         LogNormal(l_mu^T s, l_sigma2^T s)             ``(B, 1)``
``rna_likelihood(l, rho)``  (10)        NB(l rho, theta)                              ``(B, G)``
``background_scale_prior``  (11b)       b_n ~ Normal(0, 1)                            ``(B, 1)``
``background_prior(s, b)``  (11)        LogNormal(c^T s + lambda b, d^T s)            ``(B, T)``
``protein_likelihood(...)`` (12)-(14)   NB(v beta + (1-v) beta alpha, phi); ``v=None``:  ``(B, T)``
                                        the mixture with v summed out
``droplet_model(droplets)`` (11c)       empty droplets: ambient beta and its counts   ``(D, T)``
==========================  ==========  ============================================  ==============

Guide blocks: ``latent_posterior(...)`` gives q(z | x, y, s) (and q(l | x, y, s) for a latent
library, from :meth:`TotalVIModule.encode`), ``background_scale_posterior(y, s)`` gives
q(b | y, s), ``background_posterior(z, cov, b)`` gives q(beta | z, s, b), ``droplet_guide``
q(beta^e | y^e, s). Non-model terms (penalties that shape training but are not part of p) are
added with :func:`penalty`; the one trace scorer (:mod:`pyro_totalvi.scoring`) leaves them out of
every reported likelihood.

The protein background
----------------------
totalVI splits a count into background (ambient antibody and non-specific binding, ``beta``) and
foreground (``beta * alpha``). As published, that split is not identified where the two mixture
components coincide or where the background level is free: measured on ECCITE-seq PBMCs, the
isotype controls' foreground probability drifted from 0.35 to 0.52 between 100 and 400 epochs.
Four model elements (all part of p, so every reported ELBO includes them) pin it down:

.. math::
    \alpha_{nt} &= m + \mathrm{ReLU}(g_\alpha(z_n, s_n))_t
        && (7')\ \text{foreground at least } m \text{ times background}\\
    b_n &\sim \mathrm{Normal}(0, 1)
        && (11b)\ \text{per-cell background shift}\\
    \log \beta_{nt} &\sim \mathrm{Normal}(c_t^\top s_n + \lambda_t b_n,\ d_t^\top s_n)
        && (11)\\
    v_{nt} &= 1 \text{ for a declared isotype control } t
        && (12')\\
    \log \beta^e_{dt} &\sim \mathrm{Normal}(c_t^\top s_d + e^\top s_d,\ d_t^\top s_d),
        \quad y^e_{dt} \sim \mathrm{NB}(\beta^e_{dt}, \phi_t)
        && (11c)\ \text{empty droplet } d

* (7') ``min_foreground_ratio`` ``m`` (default 3): with ``alpha`` near 1 the two components
  coincide, the likelihood is flat in ``pi`` and ``pi`` drifts with training length; a foreground
  that cannot be told from background is not called foreground.
* (11b) ``background_cell_scale``: non-specific binding varies between cells (cell size, Fc
  receptors) and moves every antibody of a cell together; ``b_n`` is that shared shift and
  ``lambda_t`` (learned, one per protein) how much protein ``t``'s background follows it. Without
  it, a cell whose background is high for all antibodies can only explain its counts as
  foreground. ``b_n`` is a *latent* variable with a guide q(b_n | y_n, s_n) rather than a plug-in
  such as ``log`` of the isotypes' total count: isotype counts are small (on ECCITE-seq 96 % of
  the cells have 0 IgG1 counts), so a plug-in would inject their Poisson noise into every
  protein's background, while the posterior weighs them against the prior and against the other
  proteins' background levels. q(beta | z, s, b) adds ``lambda_t b_n`` to its location as the
  prior does, so the guide can follow the shift exactly.
* (12') declared isotype controls (``isotype_controls``) are background only (``pi`` fixed to 1
  through a logit of :data:`BACKGROUND_ONLY_LOGIT`, in both the marginal and the enumerated
  form): their counts are direct observations of ``b_n``, ``c`` and ``d``.
* (11c) ``empty_droplets``: droplets with ambient antibody but no cell share ``c``, ``d`` and
  ``phi`` with the cells (``e_k``, learned, is the log ratio of a batch's ambient level to its
  cell background), so they pin each protein's background level, which the cells alone leave
  free up to the foreground ratio. Their background ``beta^e`` is latent with its own amortised
  guide q(beta^e | y^e, s) (not a plug-in and not marginalised: the LogNormal-NB has no closed
  form, and the latent keeps Eq. (11)'s prior family). The droplets form their own plate,
  subsampled at every training step and scaled by ``D / B_e``, so the ELBO estimate stays
  unbiased. They are training data for the global parameters, not cells: the per-cell ELBO that
  :mod:`~pyro_totalvi.scoring` reports (history, ``get_elbo``) contains the cells' terms only.

The foreground probability reported to users is the responsibility P(v = 0 | y, z, beta), not the
prior weight 1 - pi (see :meth:`~pyro_totalvi.NegativeBinomialMixture.first_component_probability`).

**Modality weights: a tempered posterior.** ``TotalVIModule(..., modality_weights={"rna": a,
"protein": b})`` trains on

.. math::

    p_{a,b}(z, l, \beta \mid x, y) \;\propto\; p(z)\, p(l)\, p(\beta)\;
    p(x \mid z, l)^{a}\; p(y \mid z, \beta)^{b},

by wrapping the RNA site ``x`` in ``poutine.scale(a)`` and the protein sites ``v``, ``y`` in
``poutine.scale(b)``: the ELBO optimised is
:math:`E_q[a \log p(x|\cdot) + b \log p(y|\cdot)] - \mathrm{KL}`, so ``b = 2`` makes every
protein count weigh as two observations against the prior and the RNA, and the encoder leans more
on the proteins. This changes the target of inference (a tempered, "power" posterior), not the
model: every reported ELBO, reconstruction error and marginal likelihood is that of the model at
weight 1 (the one trace scorer ignores ``poutine.scale``), so models trained with different
weights compare on the same scale. ``{"rna": 1, "protein": 1}`` (the default) is the model of
the totalVI user guide, and trains exactly as without the option.
:meth:`pyro_totalvi.TOTALVI.get_modality_contributions` shows the resulting balance.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from .distributions import NegativeBinomial, NegativeBinomialMixture
from .nn import BackgroundEncoder, CountEncoder, Decoder, Encoder

__all__ = ["TotalVIModule", "penalty", "PENALTY", "BACKGROUND_ONLY_LOGIT", "MODALITIES",
           "check_modality_weights", "MAX_PLATE_NESTING"]

#: ``infer`` key that marks a site as a non-model factor (see :func:`penalty`).
PENALTY = "penalty"
#: Plates nest two deep (cells at ``dim=-2``, genes or proteins at ``dim=-1``); enumerated sites
#: take the dimensions to the left, from ``-(MAX_PLATE_NESTING + 1)`` on.
MAX_PLATE_NESTING = 2
#: logit pi of a declared isotype control: sigma(w) = 1 and log sigma(-w) = -1e4 in float32, so
#: the foreground component adds exactly nothing (an infinite logit would make Pyro's Bernoulli
#: log density NaN in the enumerated form).
BACKGROUND_ONLY_LOGIT = 1e4

#: The two modalities, as named in ``modality_weights`` and in modality contributions.
MODALITIES = ("rna", "protein")


def check_modality_weights(weights: dict | None) -> dict[str, float]:
    """``{"rna": a, "protein": b}`` as Python floats (a missing key is 1); raises ``ValueError``
    on an unknown key or a weight that is not a finite number > 0."""
    if weights is None:
        weights = {}
    if not isinstance(weights, dict):
        raise ValueError(f"modality_weights must be a dict like {{'rna': 1.0, 'protein': 2.0}}, "
                         f"got {type(weights).__name__}")
    unknown = sorted(map(str, set(weights) - set(MODALITIES)))
    if unknown:
        raise ValueError(f"modality_weights has unknown keys {unknown}; the modalities are "
                         f"{list(MODALITIES)}")
    out = {}
    for name in MODALITIES:
        w = weights.get(name, 1.0)
        try:
            w_float = float(w)
        except (TypeError, ValueError):
            raise ValueError(f"modality_weights[{name!r}] must be a number, got {w!r}") from None
        if isinstance(w, bool) or not math.isfinite(w_float) or w_float <= 0:
            raise ValueError(f"modality_weights[{name!r}] must be a finite number > 0, got {w!r}")
        out[name] = w_float
    return out


def penalty(name: str, log_factor: torch.Tensor, has_rsample: bool | None = None) -> None:
    """Add ``log_factor`` to the training objective as a *non-model* term.

    Like ``pyro.factor``, but the site carries ``infer={"penalty": True}``: SVI optimises it,
    while :func:`pyro_totalvi.scoring.trace_terms` (and so every reported ELBO, reconstruction
    error and marginal likelihood) leaves it out. In a guide, a factor enters the ELBO as
    ``-log_factor`` and Pyro asks for ``has_rsample`` (``True``: differentiate it directly).
    """
    unit = dist.Unit(log_factor, has_rsample=has_rsample)
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
    scale_encoder_input
        Divide each cell's RNA and protein counts by 1 + their mean before the encoder's
        ``log1p``, as scvi-tools 1.4 does (:class:`~pyro_totalvi.nn.Encoder`); ``False`` (the
        default): ``log1p`` of the counts. It makes mapping RNA-only queries onto a reference
        much better (README, "Mapping new data onto a reference").
    encoder_protein_dropout
        In training, the probability that q(z | x, y, s) sees a cell without its proteins (its
        encoder input zeroed, as for a cell whose proteins were not measured): modality dropout
        in the guide only, so the encoder learns to place RNA-only cells (an RNA-only query
        mapped onto this reference) among the others. The model and every reported ELBO are
        unchanged (eval mode encodes every measured protein); default 0: off.
    modality_weights
        ``{"rna": a, "protein": b}`` (missing keys: 1): temper the RNA likelihood (site ``x``)
        by ``a`` and the protein likelihood (``v``, ``y``) by ``b`` in training, a tempered
        posterior (see the module docstring); reported likelihoods stay at weight 1. Default
        ``None``: 1 and 1, the untempered model.
    min_foreground_ratio
        ``m`` of Eq. (7'): ``alpha >= m`` (1 is the published model; see the module docstring).
    isotype_controls
        Column indices of declared isotype controls: background only (Eq. 12').
    background_cell_scale
        Add the per-cell background shift ``b_n`` with per-protein loadings (Eqs. 11, 11b).
    empty_droplets
        Model empty droplets (Eq. 11c), passed to :meth:`model` as ``droplets``.
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
        background_preference: float = 0.1,
        protein_warmup: bool = True,
        scale_encoder_input: bool = False,
        encoder_protein_dropout: float = 0.0,
        modality_weights: dict[str, float] | None = None,
        min_foreground_ratio: float = 3.0,
        isotype_controls: list[int] | None = None,
        background_cell_scale: bool = True,
        empty_droplets: bool = False,
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
        if not 0.0 <= encoder_protein_dropout < 1.0:
            raise ValueError(f"encoder_protein_dropout must be in [0, 1), got "
                             f"{encoder_protein_dropout!r}")
        self.encoder_protein_dropout = float(encoder_protein_dropout)
        self.modality_weights = check_modality_weights(modality_weights)
        self._set_background_settings(min_foreground_ratio, isotype_controls,
                                      background_cell_scale, empty_droplets, n_panels)
        #: encoder sizes, for an extension's networks on the guide side (e.g. a classifier)
        self.encoder_sizes = dict(n_hidden=n_hidden, n_layers=n_layers_encoder,
                                  dropout=dropout_rate_encoder)
        n_cov = n_batches + n_covariates

        self.encoder = Encoder(n_genes, n_proteins, n_latent, n_cov if encode_covariates else 0,
                               n_hidden, n_layers_encoder, dropout_rate_encoder,
                               latent_library=not self.use_observed_lib_size,
                               scale_input=scale_encoder_input)
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
        self._init_background_options(n_proteins, n_batches, n_cov)
        if not use_size_factor_key:
            self._register_library_prior(n_batches, library_log_means, library_log_vars)

    def _register_library_prior(self, n_batches: int, log_means, log_vars) -> None:
        """l_mu and l_sigma^2 of Eq. (5): data statistics, not learned, so buffers (none when a
        size factor is the library: it is never latent then, as in scvi-tools)."""
        zeros = torch.zeros(n_batches)
        self.register_buffer("library_log_means", torch.as_tensor(
            zeros if log_means is None else log_means, dtype=torch.float32))
        self.register_buffer("library_log_vars", torch.as_tensor(
            zeros + 1 if log_vars is None else log_vars, dtype=torch.float32))

    def _set_background_settings(self, min_foreground_ratio: float, isotype_controls,
                                 background_cell_scale: bool, empty_droplets: bool,
                                 n_panels: int | None) -> None:
        """Check and store the options of Eqs. (7'), (11b), (11c) and (12')."""
        self.min_foreground_ratio = float(min_foreground_ratio)
        if self.min_foreground_ratio < 1.0:
            raise ValueError(f"min_foreground_ratio must be >= 1, got {min_foreground_ratio}")
        self.isotype_controls = sorted({int(t) for t in isotype_controls or []})
        self.background_cell_scale = bool(background_cell_scale)
        self.empty_droplets = bool(empty_droplets)
        if self.empty_droplets and n_panels is not None:
            raise ValueError("empty_droplets needs the background prior per batch (the droplets "
                             "have a batch, not a panel); it cannot be combined with n_panels")

    def _init_background_options(self, n_proteins: int, n_batches: int, n_cov: int) -> None:
        """Buffers, parameters and guide networks of isotype controls, the per-cell background
        shift and empty droplets (none of them exist when the option is off)."""
        mask = torch.zeros(n_proteins, dtype=torch.bool)
        mask[self.isotype_controls] = True
        self.register_buffer("isotype_mask", mask if self.isotype_controls else None)
        if self.background_cell_scale:
            # lambda_t of Eq. (11): each protein's loading on the per-cell shift b_n ~ N(0, 1);
            # q(b_n | y, s) from the protein counts
            self.background_loading = nn.Parameter(torch.full((n_proteins,), 0.3))
            self.background_scale_encoder = CountEncoder(n_proteins, 1, n_cov)
        if self.empty_droplets:
            # e_k of Eq. (11c): log ratio of the droplets' ambient level to the cells' background
            self.droplet_log_offset = nn.Parameter(torch.zeros(n_batches))
            self.droplet_encoder = CountEncoder(n_proteins, n_proteins, n_batches)

    # ------------------------------------------------------------------------------------------
    #: Names of the per-cell extension inputs (``Minibatch.extras``, registered with
    #: :func:`pyro_totalvi.data.register_obs_codes`) that :meth:`model` and :meth:`guide` take as
    #: keyword arguments; the base model takes none.
    extra_inputs: tuple[str, ...] = ()

    @property
    def enumerates(self) -> bool:
        """Whether a site is enumerated in parallel (then train with ``TraceEnum_ELBO``)."""
        return self.protein_mixture == "enumerate"

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

    def modality_scale(self, modality: str):
        """``poutine.scale`` by the modality's weight, or nothing at weight 1 (so that the
        default trains bit for bit as the model without the option)."""
        weight = self.modality_weights[modality]
        return contextlib.nullcontext() if weight == 1.0 else poutine.scale(scale=weight)

    # -- model blocks ------------------------------------------------------------------------------
    def latent_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (1): p(z_n) = Normal(0, I), event shape ``(d,)`` (on the data's device)."""
        return dist.Normal(s.new_zeros(self.n_latent), 1.0).to_event(1)

    def decode(self, z: torch.Tensor, cov: torch.Tensor):
        """Eqs. (2)-(4), (6)-(8): ``rho (B, G)``, ``alpha (B, T) >= 1`` and the *logits* of
        ``pi (B, T)`` from ``z (B, d)`` and ``cov`` = ``s ⊕ covariates``. ``rho`` is on the
        simplex, or only non-negative with ``use_size_factor_key`` (softplus)."""
        rho, alpha, pi_logits = self.decoder(z, cov)
        if self.isotype_mask is not None:  # declared isotype controls: background only, v = 1
            pi_logits = torch.where(self.isotype_mask, BACKGROUND_ONLY_LOGIT, pi_logits)
        return rho, alpha + (self.min_foreground_ratio - 1.0), pi_logits

    def library_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (5): LogNormal(l_mu^T s_n, l_sigma2^T s_n), ``(B, 1)``; used when the library is
        latent (``use_observed_lib_size=False``)."""
        l_mu = (s @ self.library_log_means).unsqueeze(-1)
        l_sigma = (s @ self.library_log_vars).sqrt().unsqueeze(-1)
        return dist.LogNormal(l_mu, l_sigma)

    def rna_likelihood(self, library: torch.Tensor, rho: torch.Tensor) -> dist.Distribution:
        """Eq. (10): NB(l_n rho_ng, theta_g), ``(B, G)``."""
        return NegativeBinomial(library * rho, self.log_theta.exp())

    def background_prior(self, s: torch.Tensor, shift: torch.Tensor | None = None,
                         panel: torch.Tensor | None = None) -> dist.Distribution:
        """Eq. (11): LogNormal(c_t^T s_n + lambda_t b_n, d_t^T s_n), ``(B, T)`` (``d`` kept on
        the log scale); ``shift`` is the per-cell background shift ``b_n`` ``(B, 1)`` (0 when
        ``None``); ``panel``, the one-hot panel ``(B, P)`` of a module with ``n_panels``, indexes
        ``c`` and ``d`` instead of ``s`` (as scvi-tools' ``panel_key``)."""
        onehot = s if panel is None else panel
        loc = onehot @ self.background_c.T
        return dist.LogNormal(loc if shift is None else loc + self.background_loading * shift,
                              (onehot @ self.background_log_d.T).exp())

    def background_scale_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (11b): the per-cell background shift b_n ~ Normal(0, 1), ``(B, 1)``."""
        return dist.Normal(s.new_zeros(s.shape[:-1] + (1,)), 1.0)

    def droplet_background_prior(self, s: torch.Tensor) -> dist.Distribution:
        """Eq. (11c): an empty droplet's ambient level, LogNormal(c_t^T s + e^T s, d_t^T s):
        :meth:`background_prior` (no per-cell shift) moved by the droplets' log ratio ``e``."""
        cells = self.background_prior(s)
        offset = (s @ self.droplet_log_offset).unsqueeze(-1)
        return dist.LogNormal(cells.loc + offset, cells.scale)

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
        background. scvi-tools uses ``w = 1e-3``; the default here is 0.1: with a foreground
        that is free to follow each cell through ``z``, a small excess over the background
        model (a heavy tail of an isotype control) was otherwise called foreground after a few
        hundred epochs. Where the counts are clearly foreground it costs ``w log pi``, a few
        tenths of a nat, and the reported foreground probability is the responsibility given
        the count, which the count decides. Not part of Eqs. (1)-(14): reported likelihoods
        leave it out (:func:`penalty`).
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
        droplets=None,
        panel: torch.Tensor | None = None,
    ):
        """p(x, y, z, l, beta, v | s).

        Parameters
        ----------
        x, y, s
            RNA ``(B, G)``, protein ``(B, T)`` counts (``None``: sampled), one-hot batch ``(B, K)``.
        log_library
            ``(B, 1)`` log library (total RNA counts or size factor), when it is observed.
        covariates
            Extra network covariates ``(B, p)``.
        protein_mask
            Boolean ``(B, T)``: ``False`` where a protein was not measured (adds nothing).
        idx, n_obs
            Indices of the minibatch among ``n_obs`` cells (see :meth:`cells_plate`).
        kl_weight
            KL warm-up factor on the local latent sites (with ``protein_warmup``, on ``y`` too;
            on ``z`` through :meth:`latent_kl_weight`).
        decode_as
            One-hot batch ``(B, K)`` that the generative networks and the background prior see
            instead of ``s``: counterfactual expression "as if measured in that batch"
            (``transform_batch``). The encoder always sees the cell's own ``s``.
        droplets
            Empty droplets (:class:`~pyro_totalvi.data.DropletBatch`; ``empty_droplets=True``):
            their sites are added by :meth:`droplet_model`.
        panel
            One-hot protein panel ``(B, P)`` (``n_panels``): indexes the background prior.

        Besides the sample sites, ``rho``, ``alpha`` and ``pi`` are recorded as
        ``pyro.deterministic`` sites so that ``pyro.infer.Predictive`` returns them.
        """
        self._register_params()
        s_gen = s if decode_as is None else decode_as
        cov = self.network_input(s_gen, covariates)  # transform_batch swaps s, not covariates
        with self.cells_plate(s.shape[0], idx, n_obs):
            with poutine.scale(scale=self.latent_kl_weight(kl_weight)):
                z = pyro.sample("z", self.latent_prior(s)).squeeze(-2)  # (1)
            with poutine.scale(scale=kl_weight):
                shift = None  # per-cell background shift b_n, shared by the proteins (11b)
                if self.background_cell_scale:
                    shift = pyro.sample("background_scale", self.background_scale_prior(s))
            rho, alpha, pi_logits = self.decode(z, cov)  # (2)-(4), (6)-(8)
            if self.use_observed_lib_size:
                library = log_library.exp()  # l_n observed: total RNA counts
            else:
                library = pyro.sample("l", self.library_prior(s))  # (5)
            with self.genes_plate():
                pyro.deterministic("rho", rho)
                with self.modality_scale("rna"):  # tempering; the scorer ignores it
                    pyro.sample("x", self.rna_likelihood(library, rho), obs=x)  # (10)
            with self.proteins_plate(protein_mask):
                pyro.deterministic("alpha", alpha)
                pyro.deterministic("pi", torch.sigmoid(pi_logits))
                with poutine.scale(scale=kl_weight):
                    beta = pyro.sample("beta", self.background_prior(s_gen, shift, panel))  # (11)
                    self.background_penalty(pi_logits)  # not in the model; warmed up as scvi-tools
                with poutine.scale(scale=kl_weight if self.protein_warmup else 1.0), \
                        self.modality_scale("protein"):
                    v = None  # "marginal": summed out analytically inside the likelihood
                    if self.protein_mixture == "enumerate":  # v_nt = 1: background only
                        v = pyro.sample("v", dist.Bernoulli(logits=pi_logits),
                                        infer={"enumerate": "parallel"})  # (12)
                    pyro.sample("y", self.protein_likelihood(beta, alpha, pi_logits, v),
                                obs=y)  # (14)
        if droplets is not None:
            self.droplet_model(droplets, kl_weight)  # (11c): ambient counts of empty droplets

    def latent_kl_weight(self, kl_weight: float) -> float:
        """The KL warm-up factor of ``z``'s sites (the model's prior and the guide's q(z))."""
        return kl_weight

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
        if self.training and self.encoder_protein_dropout:
            # modality dropout: some cells are encoded from their RNA alone, as an RNA-only
            # query's will be; the guide stays a valid q (it just conditions on less)
            keep = torch.rand(y.shape[:-1] + (1,), device=y.device) >= self.encoder_protein_dropout
            y = y * keep
        cov = self.network_input(s, covariates) if self.encode_covariates else None
        return self.encoder(x, y, cov)

    def latent_posterior(self, *args) -> tuple[dist.Distribution, dist.Distribution | None]:
        """q(z | x, y, s) with event shape ``(d,)`` on ``(B, 1)``, and q(l | x, y, s) ``(B, 1)``
        (``None`` for an observed library); takes :meth:`encode`'s arguments."""
        z_loc, z_scale, l_loc, l_scale = self.encode(*args)
        q_z = dist.Normal(z_loc.unsqueeze(-2), z_scale.unsqueeze(-2)).to_event(1)
        return q_z, None if l_loc is None else dist.LogNormal(l_loc, l_scale)

    def background_posterior(self, z: torch.Tensor, cov: torch.Tensor,
                             shift: torch.Tensor | None = None) -> dist.Distribution:
        """q(beta | z, s, b) = LogNormal ``(B, T)`` from ``z (B, d)`` and ``s ⊕ covariates``;
        the per-cell shift ``b_n`` ``(B, 1)``, when there is one, moves every protein's location
        as it moves the prior's (the guide mirrors Eq. 11)."""
        loc, scale = self.background_encoder(z, cov)
        return dist.LogNormal(loc if shift is None else loc + self.background_loading * shift,
                              scale)

    def background_scale_posterior(self, y: torch.Tensor, s: torch.Tensor,
                                   covariates: torch.Tensor | None = None,
                                   protein_mask: torch.Tensor | None = None) -> dist.Distribution:
        """q(b_n | y_n, s_n) = Normal ``(B, 1)`` from the cell's protein counts (unmeasured
        entries zeroed), where the isotype controls are the direct evidence."""
        if protein_mask is not None:
            y = y * protein_mask
        return dist.Normal(*self.background_scale_encoder(y, self.network_input(s, covariates)))

    # -- empty droplets (Eq. 11c) ------------------------------------------------------------------
    def droplet_model(self, droplets, kl_weight: float = 1.0) -> None:
        """Sites of a minibatch of empty droplets: ambient background and its counts.

        ``droplet_beta_dt ~ droplet_background_prior(s_d)`` and ``droplet_y_dt ~ NB(droplet_beta_dt,
        phi_t)``, in a plate ``"droplets"`` of ``droplets.n_obs`` droplets subsampled to
        ``droplets.idx`` (scaled by ``n_obs / B``: an unbiased estimate of the full term). The
        droplets share ``c``, ``d`` and ``phi`` with the cells: they are what pins the per-protein
        background level that the cells alone leave free.
        """
        with self.droplets_plate(droplets):
            with poutine.scale(scale=kl_weight):
                beta = pyro.sample("droplet_beta", self.droplet_background_prior(droplets.s))
            with poutine.scale(scale=kl_weight if self.protein_warmup else 1.0):
                pyro.sample("droplet_y", NegativeBinomial(beta, self.log_phi.exp()),
                            obs=droplets.y)

    def droplet_guide(self, droplets, kl_weight: float = 1.0) -> None:
        """q(droplet_beta | y_d, s_d): LogNormal from the droplet's own counts."""
        y = droplets.y if droplets.protein_mask is None else droplets.y * droplets.protein_mask
        loc, scale = self.droplet_encoder(y, droplets.s)
        with self.droplets_plate(droplets), poutine.scale(scale=kl_weight):
            pyro.sample("droplet_beta", dist.LogNormal(loc, scale))

    @contextlib.contextmanager
    def droplets_plate(self, droplets):
        """Droplets (``dim=-2``, subsampled to ``droplets.idx``) x proteins (``dim=-1``), with
        the proteins unmeasured in a droplet's batch masked out."""
        mask = True if droplets.protein_mask is None else droplets.protein_mask
        with pyro.plate("droplets", droplets.n_obs, subsample=droplets.idx, dim=-2), \
                pyro.plate("droplet_proteins", self.n_proteins, dim=-1), poutine.mask(mask=mask):
            yield

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
        droplets=None,
        panel: torch.Tensor | None = None,
    ):
        """q(beta | z, s, b) q(b | y, s) q(z | x, y, s) q(l | x, y, s); arguments as :meth:`model`."""
        self._register_params()
        cov_gen = self.network_input(s if decode_as is None else decode_as, covariates)
        q_z, q_l = self.latent_posterior(x, y, s, log_library, covariates, protein_mask)
        with self.cells_plate(s.shape[0], idx, n_obs):
            with poutine.scale(scale=self.latent_kl_weight(kl_weight)):
                z = pyro.sample("z", q_z).squeeze(-2)
            with poutine.scale(scale=kl_weight):
                shift = None
                if self.background_cell_scale:
                    shift = pyro.sample("background_scale", self.background_scale_posterior(
                        y, s, covariates, protein_mask))
            if q_l is not None:
                pyro.sample("l", q_l)
            with self.proteins_plate(protein_mask), poutine.scale(scale=kl_weight):
                pyro.sample("beta", self.background_posterior(z, cov_gen, shift))
        if droplets is not None:
            self.droplet_guide(droplets, kl_weight)
