r"""Bayesian differential expression of genes and proteins between groups of cells.

For a feature with denoised expression :math:`h` (RNA: :math:`\rho_{ng}`; protein:
:math:`(1-\pi_{nt})\beta_{nt}\alpha_{nt}` plus ``protein_prior_count``, with the options of
``get_normalized_expression``), ``n_samples_overall`` draws :math:`h^{(1)}` from cells of group 1
and as many :math:`h^{(2)}` from group 2 are taken from the posterior (a random cell, then one
draw of q for it) and paired. With ``batch_correction`` the draws are decoded in each batch of
``batchid1`` (``batchid2``; default: every batch), an equal share per batch, and paired within a
batch. With the log fold change :math:`r = \log_2(h^{(1)} + c) - \log_2(h^{(2)} + c)` (``c`` =
``pseudocounts``):

- ``mode="change"``: :math:`p_+ = P(r \ge \delta)`, :math:`p_- = P(r < -\delta)` and
  :math:`p(\mathrm{DE}) = \max(p_+, p_-)` (``test_mode="three"``, the default) or
  :math:`p_+ + p_-` (``"two"``); the Bayes factor is
  :math:`\log p(\mathrm{DE}) - \log(1 - p(\mathrm{DE}))`. The ``lfc_*`` summaries use
  :math:`10^{-3} c`. Features are called DE by controlling the posterior expected false
  discovery proportion at ``fdr_target``: sort by :math:`p(\mathrm{DE})` and keep the largest
  set whose mean :math:`1 - p(\mathrm{DE})` is at most the target.
- ``mode="vanilla"``: :math:`p_{m1} = P(h^{(1)} > h^{(2)})`, :math:`p_{m2} = 1 - p_{m1}`, Bayes
  factor :math:`\log p_{m1} - \log p_{m2}`.

This is the procedure of scvi-tools 1.4.2 (Boyeau et al. 2019/2023, ``DifferentialComputation``),
with its arguments, columns, row names (proteins as ``<name>_protein``) and row order (by
``proba_de``, or the Bayes factor in vanilla mode, decreasing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .data import TotalVIDataError
from .rng import rng_scope

__all__ = ["DEMixin", "fdr_calls", "estimate_delta", "estimate_pseudocounts"]

_EPS = 1e-8
#: ``**kwargs`` of ``differential_expression`` (scvi-tools' ``get_bayes_factors`` settings).
DE_KWARGS = {"n_samples_overall": 5000, "test_mode": "three", "use_permutation": False,
             "m_permutation": 10000, "threshold_counts": 0.01, "cred_interval_lvls": None,
             "n_samples": None, "seed": 0}


def fdr_calls(proba_de: np.ndarray, fdr_target: float) -> np.ndarray:
    """Largest set of features with posterior expected FDR <= ``fdr_target``."""
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    n_calls = int(np.sum(expected_fdr <= fdr_target)) if len(order) else 0
    # expected_fdr is non-decreasing along a sorted list, so the passing set is a prefix
    calls = np.zeros(len(order), dtype=bool)
    calls[order[:n_calls]] = True
    return calls


def estimate_delta(lfc_means: np.ndarray, coef: float = 0.6, min_thres: float = 0.1) -> float:
    """scvi-tools' ``delta=None``: ``coef`` x the mean absolute location of the outer two of three
    Gaussian-mixture components of the features' mean LFCs, at least ``min_thres``."""
    from sklearn.mixture import GaussianMixture

    gmm = GaussianMixture(n_components=3, random_state=0).fit(np.asarray(lfc_means)[:, None])
    locs = np.sort(gmm.means_.ravel())
    return float(max(min_thres, coef * np.abs(locs[[0, -1]]).mean()))


def estimate_pseudocounts(s1: np.ndarray, s2: np.ndarray, zero1: np.ndarray,
                          zero2: np.ndarray, quantile: float = 0.9) -> float:
    """scvi-tools' ``pseudocounts=None``: the ``quantile`` of the largest draws of features
    without observed counts in a group (the larger of the two groups' values), divided by the
    number of features, at least 1e-10. Shrinks the LFC of unexpressed features towards 0."""
    eps = [np.quantile(s.max(0)[zero], quantile) if zero.any() else 1e-10
           for s, zero in ((s1, zero1), (s2, zero2))]
    return float(max(1e-10, max(eps) / s1.shape[1]))


def _lfc_table(s1, s2, mode, delta, pseudocounts, test_mode, cred_levels) -> dict:
    """The Bayes-factor columns of one comparison from paired draws ``s1``, ``s2``
    ``(pairs, features)`` (see the module docstring)."""
    if mode == "vanilla":
        p = (s1 > s2).mean(0)
        return {"proba_m1": p, "proba_m2": 1.0 - p,
                "bayes_factor": np.log(p + _EPS) - np.log(1.0 - p + _EPS)}
    lfc = np.log2(s1 + pseudocounts) - np.log2(s2 + pseudocounts)
    delta = estimate_delta(lfc.mean(0)) if delta is None else delta
    p_up, p_down = (lfc >= delta).mean(0), (lfc < -delta).mean(0)
    p = np.maximum(p_up, p_down) if test_mode == "three" else p_up + p_down
    out = {"proba_de": p, "proba_not_de": 1.0 - p,
           "bayes_factor": np.log(p + _EPS) - np.log(1.0 - p + _EPS)}
    out["pseudocounts"], out["delta"] = pseudocounts, delta
    small = np.log2(s1 + 1e-3 * pseudocounts) - np.log2(s2 + 1e-3 * pseudocounts)
    out.update(lfc_mean=small.mean(0), lfc_median=np.median(small, 0), lfc_std=small.std(0),
               lfc_min=small.min(0), lfc_max=small.max(0))
    for level in cred_levels or []:
        lo, hi = _hpd(small, level)
        out[f"lfc_confidence_interval_{str(level)[:5]}_min"] = lo
        out[f"lfc_confidence_interval_{str(level)[:5]}_max"] = hi
    return out


def _hpd(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the narrowest interval holding a fraction ``level`` of the draws."""
    ordered = np.sort(samples, axis=0)
    n = len(ordered)
    k = int(np.floor(level * n))
    if not 0 < k < n:
        raise ValueError(f"credible interval level {level} needs 0 < level < 1 and more draws")
    widths = ordered[k:] - ordered[: n - k]
    start = widths.argmin(0)
    cols = np.arange(ordered.shape[1])
    return ordered[start, cols], ordered[start + k, cols]


class DEMixin:
    """``differential_expression`` for :class:`~pyro_totalvi.TOTALVI`."""

    @torch.no_grad()
    def _de_draws(self, data, cells: np.ndarray, n: int, code: int | None, rng, options: dict,
                  batch_size: int | None) -> np.ndarray:
        """``n`` draws of denoised expression ``(n, features)`` from random cells of ``cells``,
        decoded in batch ``code`` (``None``: each cell's own). Memory O(n x features)."""
        chosen = rng.choice(cells, size=n, replace=True)
        quantity = self._denoised(1, options["sample_protein_mixing"],
                                  options["include_protein_background"], options["scale_protein"])
        rna, pro = self._average_draws(data, chosen, batch_size, [code], 1,
                                       ["rho", "alpha", "pi", "beta"], quantity,
                                       (self.module.n_genes, self.module.n_proteins))
        parts = [rna] if "rna" in options["use_field"] else []
        if "protein" in options["use_field"]:
            parts.append(pro + options["protein_prior_count"])
        # float32, as the draws come (and as scvi-tools computes): half the memory traffic of
        # the LFC statistics over (draws x features)
        return np.concatenate(parts, axis=1)

    def _paired_draws(self, data, cells1, cells2, codes1, codes2, rng, n_total, options,
                      batch_size, use_permutation=False, m_permutation=10000):
        """Paired draws of the two groups: within each batch when both are decoded in the same
        batches (``batch_correction``), else across; also each group's mean draw (scale1/2)."""
        n_each = [max(2, int(n_total / len(codes))) for codes in (codes1, codes2)]
        draws = [[self._de_draws(data, cells, n, code, rng, options, batch_size)
                  for code in codes] for cells, codes, n in
                 ((cells1, codes1, n_each[0]), (cells2, codes2, n_each[1]))]
        whole = [d[0] if len(d) == 1 else np.concatenate(d) for d in draws]
        means = [w.mean(0, dtype=np.float64) for w in whole]
        same = codes1 != [None] and set(codes1) == set(codes2)
        blocks = ([(draws[0][i], draws[1][codes2.index(c)]) for i, c in enumerate(codes1)]
                  if same else [tuple(whole)])
        pairs1, pairs2 = [], []
        for a, b in blocks:
            if use_permutation:
                m = max(1, m_permutation // len(blocks))
                a, b = a[rng.integers(0, len(a), m)], b[rng.integers(0, len(b), m)]
            else:  # draws come from random cells already: pair them in order
                k = min(len(a), len(b))
                a, b = a[:k], b[:k]
            pairs1.append(a)
            pairs2.append(b)
        return np.concatenate(pairs1), np.concatenate(pairs2), means

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "change",
        delta: float | None = 0.25,
        batch_size: int | None = None,
        all_stats: bool = True,
        batch_correction: bool = False,
        batchid1: Sequence[str] | None = None,
        batchid2: Sequence[str] | None = None,
        fdr_target: float = 0.05,
        silent: bool = False,
        protein_prior_count: float = 0.1,
        scale_protein: bool = False,
        sample_protein_mixing: bool = False,
        include_protein_background: bool = False,
        use_field: Sequence[str] | None = None,
        pseudocounts: float | None = 1e-5,
        **kwargs,
    ) -> pd.DataFrame:
        """Differential expression of genes and proteins (scvi-tools' arguments and columns);
        see the module docstring for the procedure.

        Parameters
        ----------
        groupby, group1, group2, idx1, idx2
            ``adata.obs`` column and groups (``group1=None``: every category against the rest;
            ``group2=None``: against the rest), or cells as masks, indices or
            ``adata.obs.query`` strings (``idx2=None``: the rest).
        mode, delta
            ``"change"`` (``P(LFC >= delta)`` vs ``P(LFC < -delta)``; ``delta=None`` estimates
            it) or ``"vanilla"`` (``P(h1 > h2)``).
        batch_correction, batchid1, batchid2
            Decode the draws of group 1 (2) in each batch of ``batchid1`` (``batchid2``;
            default: all) and pair draws of the same batch; without it each cell keeps its own
            batch (``batchid*`` then raise, as in scvi-tools).
        protein_prior_count, scale_protein, sample_protein_mixing, include_protein_background
            Protein expression as in ``get_normalized_expression``, plus this prior count.
        batch_size, all_stats, fdr_target
            Cells per posterior chunk; add raw-count columns; FDR target of the DE calls.
        use_field, pseudocounts, silent
            ``["rna", "protein"]`` or one of them; the LFC's pseudocount (``None``: estimated);
            ``False`` shows a progress bar over the comparisons.
        **kwargs
            ``n_samples_overall`` (draws per group, default 5000; alias ``n_samples``),
            ``test_mode`` (``"three"``/``"two"``), ``use_permutation``, ``m_permutation``,
            ``threshold_counts``, ``cred_interval_lvls`` (adds ``lfc_confidence_interval_*``
            columns), ``seed`` (cell choice, draws, pairing; the caller's generators untouched).

        Returns
        -------
        scvi-tools' table (:meth:`_de_frame`): rows by feature (proteins as
        ``<name>_protein``) sorted by ``proba_de`` (vanilla: ``bayes_factor``), its columns in
        its order, plus ``is_protein``.
        """
        opts, use_field = _de_options(kwargs, mode, use_field)
        data = self._data(adata)
        codes1, codes2 = self._de_codes(batch_correction, batchid1, batchid2)
        options = dict(use_field=use_field, protein_prior_count=protein_prior_count,
                       scale_protein=scale_protein, sample_protein_mixing=sample_protein_mixing,
                       include_protein_background=include_protein_background)
        comparisons = self._comparisons(self.adata if adata is None else adata, groupby, group1,
                                        group2, idx1, idx2)
        self.module.eval()
        tables = []
        bar = tqdm(comparisons, desc="Differential expression", unit="comparison",
                   disable=silent or len(comparisons) < 2)
        for name1, name2, cells1, cells2 in bar:
            with rng_scope(opts["seed"]):  # same seed, same table; caller's generators untouched
                table = self._compare(data, cells1, cells2, codes1, codes2, options, opts, mode,
                                      delta, pseudocounts, batch_size)
            tables.append(self._de_frame(table, mode, fdr_target, all_stats, data, cells1,
                                         cells2, use_field, None if idx1 is not None
                                         else (name1, name2)))
        return pd.concat(tables) if len(tables) > 1 else tables[0]

    def _compare(self, data, cells1, cells2, codes1, codes2, options, opts, mode, delta,
                 pseudocounts, batch_size) -> dict:
        """The Bayes-factor and scale columns of one comparison."""
        rng = np.random.default_rng(opts["seed"])
        s1, s2, (m1, m2) = self._paired_draws(
            data, cells1, cells2, codes1, codes2, rng, opts["n_samples_overall"], options,
            batch_size, opts["use_permutation"], opts["m_permutation"])
        if pseudocounts is None and mode == "change":
            zero1, zero2 = (self._raw_means(data, c, options["use_field"])
                            < opts["threshold_counts"] for c in (cells1, cells2))
            pseudocounts = estimate_pseudocounts(s1, s2, zero1, zero2)
        return {**_lfc_table(s1, s2, mode, delta, pseudocounts, opts["test_mode"],
                             opts["cred_interval_lvls"]), "scale1": m1, "scale2": m2}

    def _de_codes(self, batch_correction: bool, batchid1, batchid2):
        """Batch codes each group is decoded in: ``[None]`` (own batch) without correction."""
        if not batch_correction:
            if batchid1 is not None or batchid2 is not None:
                raise ValueError("batchid1 / batchid2 choose the batches to decode in and need "
                                 "batch_correction=True (scvi-tools: 'Inconsistent batch "
                                 "policy')")
            return [None], [None]
        every = list(range(self.module.n_batches))
        codes = [every if ids is None else self._batch_codes(
            list(ids) if isinstance(ids, (list, tuple, np.ndarray, pd.Index)) else [ids])
            for ids in (batchid1, batchid2)]
        return codes[0], codes[1]

    def _comparisons(self, adata, groupby, group1, group2, idx1, idx2):
        """``[(name1, name2, cells1, cells2)]``, scvi-tools' groups (categories in order)."""
        if idx1 is not None:
            cells1 = _as_cells(adata, idx1)
            cells2 = (np.setdiff1d(np.arange(adata.n_obs), cells1) if idx2 is None
                      else _as_cells(adata, idx2))
            out = [("one", "two" if idx2 is not None else "Rest", cells1, cells2)]
        else:
            if groupby is None or groupby not in adata.obs:
                raise KeyError(f"groupby {groupby!r} not in adata.obs (columns: {list(adata.obs)})")
            labels = adata.obs[groupby].astype(str).to_numpy()
            cats = [str(c) for c in adata.obs[groupby].astype("category").cat.categories]
            if group1 is None and len(cats) == 1:
                raise ValueError("Only a single group in the data. Can't run DE on a single "
                                 "group.")
            groups = cats if group1 is None else (
                [group1] if isinstance(group1, str) or not np.iterable(group1) else list(group1))
            out = []
            for g in map(str, groups):
                if g not in cats:
                    raise TotalVIDataError(f"group {g!r} not in adata.obs[{groupby!r}] ({cats[:10]})")
                if group2 is not None and str(group2) not in cats:
                    raise TotalVIDataError(f"group2 {group2!r} not in adata.obs[{groupby!r}]")
                rest = labels != g if group2 is None else labels == str(group2)
                out.append((g, "Rest" if group2 is None else str(group2),
                            np.flatnonzero(labels == g), np.flatnonzero(rest)))
        for name1, name2, c1, c2 in out:
            if len(c1) == 0 or len(c2) == 0:
                raise TotalVIDataError(f"comparison {name1} vs {name2} has an empty group")
        return out

    @staticmethod
    def _raw_means(data, cells: np.ndarray, use_field) -> np.ndarray:
        """Mean raw count of each selected feature over ``cells``."""
        x, y = data.X[np.sort(cells)], data.Y[np.sort(cells)]
        parts = [np.asarray(x.mean(0)).ravel()] if "rna" in use_field else []
        return np.concatenate(parts + ([y.mean(0)] if "protein" in use_field else []))

    def _de_frame(self, table: dict, mode, fdr_target, all_stats, data, cells1, cells2,
                  use_field, names) -> pd.DataFrame:
        """One comparison's DataFrame, as scvi-tools': ``proba_de, proba_not_de,
        bayes_factor, scale1, scale2, pseudocounts, delta, lfc_mean, lfc_median, lfc_std,
        lfc_min, lfc_max, raw_mean1, raw_mean2, non_zeros_proportion1, non_zeros_proportion2,
        raw_normalized_mean1, raw_normalized_mean2, is_de_fdr_<target>`` (vanilla: ``proba_m1,
        proba_m2, bayes_factor, scale1, scale2`` and the raw columns), then ``comparison,
        group1, group2`` when the groups come from ``groupby``, and ``is_protein``."""
        index = ([str(g) for g in self.adata.var_names] if "rna" in use_field else []) + (
            [f"{p}_protein" for p in self.registry["protein_names"]]
            if "protein" in use_field else [])
        order = (["proba_de", "proba_not_de", "bayes_factor", "scale1", "scale2",
                  "pseudocounts", "delta"] if mode == "change"
                 else ["proba_m1", "proba_m2", "bayes_factor", "scale1", "scale2"])
        columns = order + ([k for k in table if k.startswith("lfc_")] if mode == "change" else [])
        frame = pd.DataFrame({k: table[k] for k in columns}, index=index)
        if all_stats:
            stats = (("raw_mean", self._raw_means), ("non_zeros_proportion", _nonzero),
                     ("raw_normalized_mean", _normalized))
            for stat, fn in stats:
                for k, cells in (("1", cells1), ("2", cells2)):
                    frame[f"{stat}{k}"] = fn(data, np.sort(cells), use_field)
        frame = frame.sort_values("proba_de" if mode == "change" else "bayes_factor",
                                  ascending=False)
        if mode == "change":
            frame[f"is_de_fdr_{fdr_target}"] = fdr_calls(frame["proba_de"].to_numpy(),
                                                         fdr_target)
        if names is not None:
            frame["comparison"] = f"{names[0]} vs {names[1]}"
            frame["group1"], frame["group2"] = names
        frame["is_protein"] = frame.index.isin(index[len(index) - (
            len(self.registry["protein_names"]) if "protein" in use_field else 0):])
        return frame


def _de_options(kwargs: dict, mode: str, use_field) -> tuple[dict, list[str]]:
    """``**kwargs`` of ``differential_expression`` with defaults, and ``use_field``; raises on
    unknown names and values."""
    unknown = sorted(set(kwargs) - set(DE_KWARGS))
    if unknown:
        raise TypeError(f"differential_expression(): unexpected {unknown}; accepted keyword "
                        f"arguments besides the named ones: {sorted(DE_KWARGS)}")
    opts = {**DE_KWARGS, **kwargs}
    if opts["n_samples"] is not None:  # this package's earlier name
        opts["n_samples_overall"] = opts["n_samples"]
    if mode not in ("change", "vanilla"):
        raise ValueError("mode must be 'change' or 'vanilla'")
    if opts["test_mode"] not in ("two", "three"):
        raise ValueError("test_mode must be 'two' or 'three'")
    use_field = ["rna", "protein"] if use_field is None else list(use_field)
    if not use_field or set(use_field) - {"rna", "protein"}:
        raise ValueError(f"use_field must be a non-empty subset of ['rna', 'protein'], got "
                         f"{use_field}")
    return opts, use_field


def _as_cells(adata, sel) -> np.ndarray:
    """Cell indices from a boolean mask, indices, or an ``adata.obs.query`` string."""
    if isinstance(sel, str):
        return np.flatnonzero(adata.obs.index.isin(adata.obs.query(sel).index))
    sel = np.asarray(sel).ravel()
    return np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64)


def _nonzero(data, cells: np.ndarray, use_field) -> np.ndarray:
    x, y = data.X[cells], data.Y[cells]
    parts = [np.asarray((x > 0).mean(0)).ravel()] if "rna" in use_field else []
    return np.concatenate(parts + ([(y > 0).mean(0)] if "protein" in use_field else []))


def _normalized(data, cells: np.ndarray, use_field) -> np.ndarray:
    """Mean RNA count per 10,000 of the cell's counts; NaN for proteins (as scvi-tools)."""
    parts = []
    if "rna" in use_field:
        x = data.X[cells]
        lib = np.asarray(x.sum(1)).ravel()[:, None]
        xn = x.multiply(1e4 / lib) if sp.issparse(x) else x * (1e4 / lib)
        parts.append(np.asarray(xn.mean(0)).ravel())
    if "protein" in use_field:
        parts.append(np.full(data.n_proteins, np.nan))
    return np.concatenate(parts)
