r"""The one trace scorer: every reported ELBO, reconstruction error and marginal likelihood.

:func:`trace_terms` takes a guide trace and the model trace replayed on it and returns, per cell,
one term per sample site of the model:

- an observed site (``x``, ``y``, ...): :math:`\log p(\mathrm{obs} \mid \ldots)`;
- a latent site (``z``, ``l``, ``beta``, ...): :math:`-\mathrm{KL}(q \,\|\, p)` (analytic where
  torch knows it, ``kl="analytic"``), or the one-draw estimate :math:`\log p - \log q`
  (``kl="sample"``, the importance weight of :meth:`TOTALVI.get_marginal_ll`).

A discrete site that the guide enumerates in parallel (a cell-type label ``c`` whose guide is a
classifier q(c | x, y)) is summed out exactly, as ``TraceEnum_ELBO`` does: every term that depends
on it is averaged over its values with the guide's probabilities,
:math:`\sum_k q(c = k)\, t_k`, and its own term is :math:`-\mathrm{KL}(q(c) \,\|\, p(c))`.

Site masks apply (unmeasured proteins add nothing); plate scales and ``poutine.scale`` weights
(subsampling, KL warm-up, modality tempering) do **not**: reported values are those of the model
at weight 1. Sites marked as non-model factors (:func:`pyro_totalvi.model.penalty`) are skipped.
A site outside the cell plate (a global prior term) is spread evenly over the ``n_obs`` cells of
the plate. Empty droplets are not cells: their terms are scored on their own plate
(:func:`droplet_elbo`), not spread over the cells.
"""

from __future__ import annotations

import contextlib
from typing import Literal

import numpy as np
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch.distributions import kl_divergence

from .data import CiteData
from .device import module_device
from .model import MAX_PLATE_NESTING, PENALTY

__all__ = ["trace_terms", "score_minibatch", "cell_terms", "elbo_terms", "evaluate",
           "site_log_prob", "protein_terms", "droplet_elbo"]


def site_log_prob(site: dict) -> torch.Tensor:
    """Elementwise log density of a trace site with its mask applied (no scaling)."""
    lp = site["fn"].log_prob(site["value"])
    return lp if site["mask"] is None else lp * site["mask"]


def _is_scored(site: dict) -> bool:
    return (site["type"] == "sample" and not site_is_subsample(site)
            and not site["infer"].get("_deterministic") and not site["infer"].get(PENALTY))


def _cells_frame(site: dict, plate: str = "cells"):
    return next((f for f in site["cond_indep_stack"] if f.name == plate), None)


def _latent_term(site: dict, q_site: dict, kl: str) -> torch.Tensor:
    """Elementwise -KL(q || p) (analytic where known) or log p - log q at the guide's draw."""
    q, p = q_site["fn"], site["fn"]
    value = None
    if kl == "analytic":
        try:
            value = -kl_divergence(q, p)
        except NotImplementedError:  # no closed form: the one-draw estimate instead
            pass
    if value is None:
        value = p.log_prob(site["value"]) - q.log_prob(site["value"])
    return value if site["mask"] is None else value * site["mask"]


def _enumerated(guide_trace) -> tuple[torch.Tensor | None, int]:
    """Joint guide probabilities of the enumerated values (``None`` if none), and how many
    dimensions on the right are plates (the enumerated ones lie to their left)."""
    sites = [site for site in guide_trace.nodes.values()
             if site["type"] == "sample" and site["infer"].get("_enumerate_dim") is not None]
    if not sites:
        return None, 0
    n_plates = -max(site["infer"]["_enumerate_dim"] for site in sites) - 1
    return sum(site_log_prob(site) for site in sites).exp(), n_plates


def _expected(value: torch.Tensor, weights: torch.Tensor | None, n_plates: int) -> torch.Tensor:
    """:math:`\\sum_k q_k t_k` over the enumerated dimensions of a term ``value``.

    A term without them is its own expectation (the guide's probabilities sum to one in every
    cell); values of probability zero add nothing, whatever the term is there.
    """
    if weights is None or value.dim() <= n_plates:
        return value
    lead = tuple(range(value.dim() - n_plates))
    value, weights = torch.broadcast_tensors(value, weights)
    return torch.where(weights > 0, weights * value, 0.0).sum(lead)


def trace_terms(model_trace, guide_trace, kl: Literal["analytic", "sample"] = "analytic",
                plate: str = "cells") -> dict[str, torch.Tensor]:
    """Per-cell terms ``(B,)`` of the ELBO, one per model sample site (see the module docstring).

    ``plate`` names the plate whose members get one term each (``"droplets"`` for empty
    droplets). The ELBO of each cell is the sum of the returned terms; with ``kl="sample"`` that
    sum is :math:`\\log p(\\ldots) - \\log q(\\ldots)` at the guide's draw (averaged over the
    values of an enumerated site, which the guide trace must then hold enumerated).
    """
    terms, global_terms = {}, {}
    weights, n_plates = _enumerated(guide_trace)
    for name, site in model_trace.nodes.items():
        if not _is_scored(site):
            continue
        q_site = guide_trace.nodes.get(name)
        if site["is_observed"] or q_site is None:
            value = site_log_prob(site)
        else:
            value = _latent_term(site, q_site, kl)
        value = _expected(value, weights, n_plates)
        frame = _cells_frame(site, plate)
        if frame is None:
            global_terms[name] = value.sum()
            continue
        value = value.movedim(frame.dim, 0)
        terms[name] = value.reshape(value.shape[0], -1).sum(-1)
    if global_terms:  # spread over the plate's n_obs cells: summed over all cells, it is whole
        n_cells = len(next(iter(terms.values())))
        sub = model_trace.nodes.get(plate)  # the subsample site knows the full size
        n_obs = sub["fn"].size if sub is not None else n_cells
        for name, value in global_terms.items():
            terms[name] = (value / n_obs).expand(n_cells)
    return terms


def score_minibatch(module, mb, n_obs: int, kl: Literal["analytic", "sample"] = "analytic"):
    """:func:`trace_terms` for one draw of the guide on minibatch ``mb``, model at full weight.

    ``mb`` holds some of ``n_obs`` cells (a global model term is spread over those ``n_obs``).
    ``v`` is summed out (the same ELBO as enumeration, without the enumeration dimension); a site
    that the guide enumerates (a label) is enumerated here too and averaged over by
    :func:`trace_terms`. Call inside ``torch.no_grad()`` and ``module.fast_calls()`` for speed.

    Returns
    -------
    ``(terms, observed)``: the per-cell terms and the names of the observed sites among them.
    """
    args, kwargs = mb.args(), dict(mb.kwargs(), idx=mb.idx, n_obs=n_obs)
    with module.v_summed_out():
        guide = poutine.enum(module.guide, first_available_dim=-MAX_PLATE_NESTING - 1)
        guide_tr = poutine.trace(guide).get_trace(*args, **kwargs)
        model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(
            *args, **kwargs)
    observed = {name for name, site in model_tr.nodes.items()
                if site["type"] == "sample" and site["is_observed"]}
    return trace_terms(model_tr, guide_tr, kl), observed


@contextlib.contextmanager
def _scoring_mode(module):
    """Networks in eval mode and Pyro validation off (:meth:`TotalVIModule.fast_calls`; as in
    training steps, it would reject the non-integer counts that setup_anndata accepts with a
    warning), the training mode restored afterwards; yields the module's device."""
    was_training = module.training
    module.eval()
    try:
        with module.fast_calls():
            yield module_device(module)
    finally:
        module.train(was_training)


@torch.no_grad()
def cell_terms(module, data: CiteData, indices: np.ndarray, batch_size: int = 1024
               ) -> tuple[dict[str, np.ndarray], set[str]]:
    """Per cell of ``indices`` (in that order), each term of the negative ELBO, networks in eval
    mode: :func:`trace_terms` with analytic KL, sign flipped.

    Returns
    -------
    ``(terms, observed)``: ``terms[name]`` is a float64 array ``(len(indices),)`` for every model
    site (``"x"``, ``"y"``: ``-log p`` of the counts under one draw of q; ``"z"``, ``"l"``,
    ``"beta"``: KL of q from the prior; ``"l"`` is 0 with an observed library), and
    ``observed`` names the observed sites among them.
    """
    indices = np.asarray(indices, dtype=np.int64)
    terms = {name: np.zeros(len(indices)) for name in ("x", "y", "z", "l", "beta")}
    observed = set()
    with _scoring_mode(module) as device:
        for start in range(0, len(indices), batch_size):
            chunk = indices[start : start + batch_size]
            mb = data.minibatch(chunk, device)  # sorted: put rows back in chunk's order
            rows = start + np.argsort(chunk, kind="stable")
            values, observed = score_minibatch(module, mb, data.n_obs)
            for name, value in values.items():
                terms.setdefault(name, np.zeros(len(indices)))[rows] = (
                    -value.double().cpu().numpy())
    return terms, observed | {"x", "y"}


@torch.no_grad()
def _negative_term_means(module, data: CiteData, indices: np.ndarray, batch_size: int):
    terms, observed = cell_terms(module, data, indices, batch_size)
    return {name: float(v.mean()) if len(v) else 0.0 for name, v in terms.items()}, observed


def elbo_terms(module, data: CiteData, indices: np.ndarray,
               batch_size: int = 1024) -> dict[str, float]:
    """Per-cell means of each term of the negative ELBO on ``indices``, networks in eval mode.

    One entry per model site (:func:`trace_terms` with analytic KL, sign flipped): ``"x"`` and
    ``"y"`` are ``-log p`` of the RNA and protein counts (a one-draw Monte Carlo estimate under
    q), ``"z"``, ``"l"``, ``"beta"`` the KL of q from the prior (``"l"`` is 0 with an observed
    library), term for term as scvi-tools' ``reconst_loss_gene``, ``reconst_loss_protein``,
    ``kl_div_z``, ``kl_div_l_gene``, ``kl_div_back_pro`` — except that scvi-tools 1.4 adds its
    two penalties (background preference, per-batch efficiency prior) to the last one. Penalties
    and warm-up weights are not included.
    """
    return _negative_term_means(module, data, indices, batch_size)[0]


@torch.no_grad()
def protein_terms(module, data: CiteData, indices: np.ndarray,
                  batch_size: int = 1024) -> dict[str, np.ndarray]:
    r"""Per-protein means over the cells ``indices`` of the protein terms of the ELBO.

    ``"y"``: :math:`\log p(y_{nt} \mid z_n, \beta_{nt})` (``v`` summed out, one draw of q),
    ``"beta"``: :math:`-\mathrm{KL}(q(\beta_{nt}) \,\|\, p(\beta_{nt}))`, each an array
    ``(T,)`` (unmeasured entries add 0): the same terms as :func:`trace_terms`, not summed over
    proteins, so that a subset of proteins (e.g. all but the isotype controls) can be compared.
    With a per-cell background shift, ``"background_scale"`` ``(1,)`` is its -KL, a term that
    all proteins of a cell share.
    """
    sums = {"y": 0.0, "beta": 0.0}
    with _scoring_mode(module) as device, module.v_summed_out():
        for start in range(0, len(indices), batch_size):
            mb = data.minibatch(indices[start : start + batch_size], device)
            args, kwargs = mb.args(), dict(mb.kwargs(), idx=mb.idx, n_obs=data.n_obs)
            guide_tr = poutine.trace(module.guide).get_trace(*args, **kwargs)
            model_tr = poutine.trace(poutine.replay(module.model, trace=guide_tr)).get_trace(
                *args, **kwargs)
            sums["y"] = sums["y"] + site_log_prob(model_tr.nodes["y"]).sum(0)
            sums["beta"] = sums["beta"] + _latent_term(
                model_tr.nodes["beta"], guide_tr.nodes["beta"], "analytic").sum(0)
            if "background_scale" in model_tr.nodes:  # shared by all proteins of a cell
                sums["background_scale"] = sums.get("background_scale", 0.0) + _latent_term(
                    model_tr.nodes["background_scale"], guide_tr.nodes["background_scale"],
                    "analytic").sum().reshape(1)
    n = max(len(indices), 1)
    return {k: (v / n).cpu().numpy() for k, v in sums.items()}


@torch.no_grad()
def droplet_elbo(module, droplets, batch_size: int = 1024) -> float:
    """Negative ELBO per empty droplet (all droplets, full weight): their own terms of the
    training objective, ``droplet_y`` and the KL of ``droplet_beta``, from :func:`trace_terms`
    on the ``"droplets"`` plate. Reported apart from the cells' per-cell ELBO (module docstring
    of :mod:`pyro_totalvi.model`)."""
    total = 0.0
    with _scoring_mode(module) as device:
        for start in range(0, droplets.n_obs, batch_size):
            batch = droplets.minibatch(np.arange(start, min(start + batch_size, droplets.n_obs)),
                                       device)
            guide_tr = poutine.trace(module.droplet_guide).get_trace(batch)
            model_tr = poutine.trace(poutine.replay(module.droplet_model, trace=guide_tr)
                                     ).get_trace(batch)
            terms = trace_terms(model_tr, guide_tr, plate="droplets")
            total -= sum(v.sum().item() for v in terms.values())
    return total / max(droplets.n_obs, 1)


def evaluate(module, data: CiteData, indices: np.ndarray, batch_size: int = 1024):
    """Mean per-cell ELBO on ``indices``, full KL weight: :func:`elbo_terms` summed up.

    Returns
    -------
    dict with ``elbo`` (negative ELBO per cell), ``reconstruction_loss`` (the observed sites)
    and ``kl_local`` (every latent site).
    """
    terms, observed = _negative_term_means(module, data, indices, batch_size)
    recon = sum(v for k, v in terms.items() if k in observed)
    kl = sum(v for k, v in terms.items() if k not in observed)
    return {"elbo": recon + kl, "reconstruction_loss": recon, "kl_local": kl}
