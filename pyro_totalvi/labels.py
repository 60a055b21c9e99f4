r"""totalANVI: cell-type labels inside totalVI's generative model, as a short extension.

:class:`TotalANVIModule` subclasses :class:`~pyro_totalvi.TotalVIModule`: it overrides one model
block (:meth:`~TotalANVIModule.latent_prior`) and one guide block
(:meth:`~TotalANVIModule.latent_posterior`), and wraps ``model`` / ``guide`` to take the labels
and add the guide's label site. Nothing of totalVI's Eqs. (2)-(14) is restated.

Model, for cell :math:`n` and :math:`K` cell types (Eq. (1) of totalVI becomes two lines):

.. math::

    c_n &\sim \mathrm{Categorical}(1/K, \ldots, 1/K)
        \quad\text{(observed where the label is known)} \\
    z_n \mid c_n &\sim \mathcal{N}(\mu_{c_n}, \mathrm{diag}\,\sigma^2_{c_n}) \\
    x_n, y_n \mid z_n, \ldots &\sim \text{totalVI, Eqs. (2)-(14)}

with learned :math:`\mu_k, \sigma_k` (initialised to 0 and 1: the untrained model *is* totalVI).

Guide: totalVI's :math:`q(z, l \mid x, y, s)\, q(\beta \mid z, s)`, and for an unlabelled cell
a classifier :math:`q(c \mid x, y, s) = \mathrm{Categorical}(\mathrm{softmax}\, f(\bar z))` on the
encoder's mean :math:`\bar z = E_q[z]`, which ``TraceEnum_ELBO`` enumerates in parallel. The
per-cell ELBO is then

.. math::

    \text{labelled } (c_n = k^*):&\quad \log p(k^*)
        - \mathrm{KL}(q(z_n) \,\|\, p(z_n \mid k^*)) + R_n \\
    \text{unlabelled}:&\quad \textstyle\sum_k q(k)\,[\log p(k)
        - \mathrm{KL}(q(z_n) \,\|\, p(z_n \mid k))] + \mathrm{H}(q(c_n)) + R_n

where :math:`R_n` is totalVI's remaining terms (reconstruction, KL of :math:`\beta`, :math:`l`).
Because :math:`q(c)` reads :math:`\bar z`, not a draw of :math:`z`, both KLs are in closed form.
To make the classifier learn from the labelled cells too (as scANVI does), training adds the
**non-model** factor :math:`w \log q(k^* \mid x_n, y_n, s_n)` for each labelled cell
(``classification_weight``; :meth:`~pyro_totalvi.TOTALANVI.train` sets
:math:`w` = ``classification_ratio`` :math:`\times` cells / labelled cells, so that, as in
scvi-tools, the objective is the mean ELBO plus ``classification_ratio`` times the mean
cross-entropy of the labelled cells). It is a :func:`~pyro_totalvi.model.penalty`: reported
likelihoods leave it out.

Why a mixture prior and not scANVI's hierarchy :math:`z \mid u, c` with :math:`u \sim
\mathcal{N}(0, I)` (scvi-tools' ``TOTALANVAE``)? (i) The label acts on :math:`z` directly: a
cluster per cell type, which the decoder cannot ignore; in the hierarchy :math:`p(z \mid c) =
\int \mathcal{N}(z; f(u, c))\, p(u)\, du` is flexible enough to carry little label information,
and scANVI relies on the classification loss. (ii) The ELBO keeps closed-form KLs, with no second
latent :math:`u`, its encoder and decoder, or a one-draw estimate of :math:`\log p(z \mid u, c)`.
(iii) At :math:`\mu = 0, \sigma = 1` it is exactly totalVI's prior, so
:meth:`~pyro_totalvi.TOTALANVI.from_totalvi_model` starts from the same model. What it gives up:
each cell type's cloud in :math:`z` is one Gaussian (the hierarchy allows any shape);
``benchmarks/labels.py`` measures the accuracy that results against scvi-tools' TOTALANVI.

Labelled and unlabelled cells in one minibatch: the model's label site takes Pyro's ``obs_mask``,
which splits it into ``c_observed`` (masked to the labelled cells) and ``c_unobserved`` (masked to
the others), and :math:`z` is drawn from :math:`p(z \mid c)` with :math:`c` the observed label or
the enumerated value. The guide's ``c_unobserved`` is the classifier for an unlabelled cell and a
point mass for a labelled one: there the model site is masked out, and the point mass keeps the
enumeration from counting that cell's terms once per label (a masked guide site would weigh every
value by one). ``tests/test_labels.py`` checks the ELBO against this formula summed by hand.
"""

from __future__ import annotations

import contextlib

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from .model import TotalVIModule, penalty
from .nn import FCLayers

__all__ = ["TotalANVIModule"]

#: logits of a point mass: exp(-1e4) is exactly 0 in float32, and no infinity reaches a gradient
_POINT_MASS = 1e4


class TotalANVIModule(TotalVIModule):
    """totalVI with a cell-type label per cell (see the module docstring for the equations).

    Parameters
    ----------
    n_labels
        Number of cell types K.
    classification_weight
        Weight :math:`w` of the non-model factor :math:`w \\log q(c^* \\mid x, y, s)` per
        labelled cell (0: none); :meth:`~pyro_totalvi.TOTALANVI.train` sets it.
    linear_classifier
        q(c | x, y, s) as one linear map of the encoder's mean instead of an MLP (with the
        encoder's depth, width and dropout, as scvi-tools).
    latent_kl_warmup
        Whether the KL warm-up factor also multiplies the latent terms p(c) p(z | c) and q(z).
        Default ``False``, as scvi-tools' TOTALANVI: its loss adds :math:`\\log q(z_1) - \\log
        p(z_1 \\mid z_2, c)` unweighted and warms up only the KL of :math:`z_2` and of the label
        (here: the guide's label site). The background KL and, with ``protein_warmup``, the
        protein likelihood are warmed up either way. ``benchmarks/README.md`` ("Label
        transfer") compares the two on BMMC.
    *args, **kwargs
        As :class:`~pyro_totalvi.TotalVIModule`.
    """

    extra_inputs = ("labels",)

    def __init__(self, *args, n_labels: int, classification_weight: float = 0.0,
                 linear_classifier: bool = False, latent_kl_warmup: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.latent_kl_warmup = bool(latent_kl_warmup)
        if n_labels < 1:
            raise ValueError(f"n_labels must be at least 1, got {n_labels}")
        self.n_labels = n_labels
        self.classification_weight = float(classification_weight)
        self.label_locs = nn.Parameter(torch.zeros(n_labels, self.n_latent))
        self.label_log_scales = nn.Parameter(torch.zeros(n_labels, self.n_latent))
        self.register_buffer("label_prior_logits", torch.zeros(n_labels))  # uniform p(c)
        sizes = self.encoder_sizes
        if linear_classifier:
            self.classifier = nn.Linear(self.n_latent, n_labels)
        else:
            self.classifier = nn.Sequential(
                FCLayers(self.n_latent, sizes["n_hidden"], n_layers=sizes["n_layers"],
                         n_hidden=sizes["n_hidden"], dropout=sizes["dropout"]),
                nn.Linear(sizes["n_hidden"], n_labels))
        self._call: dict = {}  # the labels of the model/guide call under way, and q(c)'s logits

    @property
    def enumerates(self) -> bool:
        return True

    @contextlib.contextmanager
    def _given(self, labels: torch.Tensor | None):
        saved, self._call = self._call, {"labels": labels}
        try:
            yield self._call
        finally:
            self._call = saved

    def cells_plate(self, n_cells: int, idx: torch.Tensor | None, n_obs: int | None):
        """The cell plate, made once per call: the guide's label site re-enters totalVI's (a
        second ``pyro.plate("cells")`` would subsample again)."""
        if self._call.get("plate") is None:
            self._call["plate"] = super().cells_plate(n_cells, idx, n_obs)
        return self._call["plate"]

    def _labels(self, n: int, device) -> torch.Tensor:
        """This call's label codes ``(B,)``, ``-1`` where unknown (all, when none were given)."""
        labels = self._call.get("labels")
        return torch.full((n,), -1, device=device) if labels is None else labels.long()

    # -- model -----------------------------------------------------------------------------------
    def latent_prior(self, s: torch.Tensor) -> dist.Distribution:
        """p(c) p(z | c): draws the label ``c`` (observed where known) and returns
        p(z | c) = Normal(mu_c, sigma_c), ``(B, 1 | d)`` (``(K, B, 1 | d)`` when enumerated)."""
        labels = self._labels(s.shape[0], s.device)
        known = (labels >= 0).unsqueeze(-1)
        prior = dist.Categorical(logits=self.label_prior_logits).expand([len(labels), 1])
        c = pyro.sample("c", prior, obs=labels.clamp_min(0).unsqueeze(-1), obs_mask=known)
        return dist.Normal(self.label_locs[c], self.label_log_scales[c].exp()).to_event(1)

    def model(self, *args, labels: torch.Tensor | None = None, **kwargs):
        """totalVI's model with the label; ``labels`` ``(B,)``: codes, ``-1`` = unknown."""
        with self._given(labels):
            return super().model(*args, **kwargs)

    def latent_kl_weight(self, kl_weight: float) -> float:
        """1 (no warm-up of p(c) p(z | c) and q(z)) unless ``latent_kl_warmup``: see the class
        docstring."""
        return kl_weight if self.latent_kl_warmup else 1.0

    # -- guide -----------------------------------------------------------------------------------
    def classify(self, z_loc: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` of q(c | x, y, s) from the encoder's mean ``z_loc`` ``(B, d)``."""
        return self.classifier(z_loc)

    def latent_posterior(self, *args):
        """totalVI's q(z | x, y, s), q(l | x, y, s); records q(c | x, y, s)'s logits for
        :meth:`label_posterior`."""
        q_z, q_l = super().latent_posterior(*args)
        self._call["logits"] = self.classify(q_z.base_dist.loc.squeeze(-2))
        return q_z, q_l

    def label_posterior(self, idx=None, n_obs=None, kl_weight: float = 1.0) -> None:
        """The guide's label site and the classification factor (see the module docstring)."""
        logits = self._call["logits"]
        labels = self._labels(logits.shape[0], logits.device)
        known, code = (labels >= 0).unsqueeze(-1), labels.clamp_min(0)
        point = (F.one_hot(code, self.n_labels).to(logits.dtype) - 1) * _POINT_MASS
        q_c = dist.Categorical(logits=torch.where(known, point, logits).unsqueeze(-2))
        with self.cells_plate(len(labels), idx, n_obs):
            with poutine.scale(scale=kl_weight):
                pyro.sample("c_unobserved", q_c, infer={"enumerate": "parallel"})
            if self.classification_weight:
                log_q = logits.log_softmax(-1).gather(-1, code.unsqueeze(-1)) * known
                # a factor in the guide enters the ELBO as -log q: hence the minus sign
                penalty("classification", -self.classification_weight * log_q, True)

    def guide(self, *args, labels: torch.Tensor | None = None, **kwargs):
        """totalVI's guide, then q(c | x, y, s) for the unlabelled cells."""
        with self._given(labels):
            super().guide(*args, **kwargs)
            self.label_posterior(kwargs.get("idx"), kwargs.get("n_obs"),
                                 kwargs.get("kl_weight", 1.0))
