r"""Bayesian differential expression of genes and proteins between groups of cells.

For a feature with denoised expression :math:`h` (RNA: :math:`\rho_{ng}`; protein:
:math:`(1-\pi_{nt})\beta_{nt}\alpha_{nt}`), draws :math:`h^{(1)}` from cells of group 1 and
:math:`h^{(2)}` from group 2 are taken from the posterior (a random cell, then one draw of q for it)
and paired at random. With the log fold change
:math:`r = \log_2(h^{(1)} + c) - \log_2(h^{(2)} + c)` (``c`` = ``protein_prior_count`` for
proteins, ``pseudocount`` for genes):

- ``mode="change"``: :math:`p(\mathrm{DE}) = P(|r| > \delta)`; the Bayes factor is
  :math:`\log p(\mathrm{DE}) - \log(1 - p(\mathrm{DE}))`. Features are called DE by controlling
  the posterior expected false discovery proportion at ``fdr_target``: sort by
  :math:`p(\mathrm{DE})` and keep the largest set whose mean :math:`1 - p(\mathrm{DE})` is at most
  the target.
- ``mode="vanilla"``: :math:`p_{m1} = P(h^{(1)} > h^{(2)})`, :math:`p_{m2} = 1 - p_{m1}`, Bayes
  factor :math:`\log p_{m1} - \log p_{m2}`.

This is the procedure of scvi-tools (Boyeau et al. 2019/2023), with the same output columns.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData
from tqdm.auto import tqdm

from .data import TotalVIDataError
from .rng import rng_scope

__all__ = ["DEMixin", "fdr_calls"]

_EPS = 1e-8


def fdr_calls(proba_de: np.ndarray, fdr_target: float) -> np.ndarray:
    """Largest set of features with posterior expected FDR <= ``fdr_target``."""
    order = np.argsort(-proba_de, kind="stable")
    expected_fdr = np.cumsum(1 - proba_de[order]) / np.arange(1, len(order) + 1)
    n_calls = int(np.sum(expected_fdr <= fdr_target)) if len(order) else 0
    # expected_fdr is non-decreasing along a sorted list, so the passing set is a prefix
    calls = np.zeros(len(order), dtype=bool)
    calls[order[:n_calls]] = True
    return calls


class DEMixin:
    """``differential_expression`` for :class:`~pyro_totalvi.TOTALVI`."""

    @torch.no_grad()
    def _scale_samples(self, data, cells: np.ndarray, n_samples: int, batch_codes,
                       protein_prior_count: float, pseudocount: float) -> np.ndarray:
        """``log2`` denoised expression draws, ``(n_samples, genes + proteins)``.

        Cells are drawn with replacement and each contributes one posterior draw, so memory is
        O(n_samples x features) and independent of the group size.
        """
        rng = np.random.default_rng(0)
        chosen = rng.choice(cells, size=n_samples, replace=True)
        (h,) = self._average_draws(
            data, chosen, None, batch_codes, 1, ["rho", "alpha", "pi", "beta"],
            lambda mb, d: (torch.cat([d["rho"], (1 - d["pi"]) * d["beta"] * d["alpha"]], -1),),
            (self.module.n_genes + self.module.n_proteins,))
        offset = torch.cat([torch.full((self.module.n_genes,), pseudocount),
                            torch.full((self.module.n_proteins,), protein_prior_count)])
        return torch.log2(torch.from_numpy(h) + offset + _EPS).numpy()

    def differential_expression(
        self,
        adata: AnnData | None = None,
        groupby: str | None = None,
        group1=None,
        group2=None,
        idx1=None,
        idx2=None,
        mode: str = "change",
        delta: float = 0.25,
        fdr_target: float = 0.05,
        batch_correction: bool = False,
        protein_prior_count: float = 0.1,
        pseudocount: float = 0.0,
        n_samples: int = 5000,
        all_stats: bool = True,
        seed: int = 0,
        silent: bool = False,
    ) -> pd.DataFrame:
        """Differential expression of genes and proteins; see the module docstring for the math.

        Parameters
        ----------
        groupby, group1, group2
            ``adata.obs`` column and the groups to compare. ``group1=None``: every category
            against the rest (one block per category). ``group2=None``: ``group1`` vs the rest.
        idx1, idx2
            Boolean masks or indices instead of ``groupby`` (``idx2=None``: the rest).
        mode, delta, fdr_target
            ``"change"`` (``P(|LFC| > delta)``) or ``"vanilla"`` (``P(h1 > h2)``).
        batch_correction
            Decode every draw in each training batch and average (compare groups as if measured
            in the same batches).
        protein_prior_count, pseudocount
            Added to protein and gene expression before the log fold change.
        n_samples
            Posterior draws per group.
        seed
            Seeds the draws (the caller's random generators are left as they were).
        silent
            ``False``: a progress bar over the comparisons (one per group with
            ``group1=None``).

        Returns
        -------
        DataFrame indexed by feature (genes, then proteins), with scvi-tools' columns:
        ``proba_de, proba_not_de, bayes_factor, scale1, scale2, lfc_mean, lfc_median, lfc_std,
        lfc_min, lfc_max, is_de_fdr_<target>, raw_mean1, raw_mean2, non_zeros_proportion1,
        non_zeros_proportion2, raw_normalized_mean1, raw_normalized_mean2``, plus
        ``is_protein``, ``comparison``, ``group1``, ``group2``; ``mode="vanilla"`` gives
        ``proba_m1, proba_m2, bayes_factor`` instead of the change columns.
        """
        if mode not in ("change", "vanilla"):
            raise ValueError("mode must be 'change' or 'vanilla'")
        adata_ = self.adata if adata is None else adata
        data = self._data(adata)
        comparisons = self._comparisons(adata_, groupby, group1, group2, idx1, idx2)
        codes = (list(range(self.module.n_batches)) if batch_correction else [None])
        self.module.eval()
        tables = []
        bar = tqdm(comparisons, desc="Differential expression", unit="comparison",
                   disable=silent or len(comparisons) < 2)
        for name1, name2, cells1, cells2 in bar:
            with rng_scope(seed):  # same seed, same table; the caller's generators untouched
                s1 = self._scale_samples(data, cells1, n_samples, codes, protein_prior_count,
                                         pseudocount)
                s2 = self._scale_samples(data, cells2, n_samples, codes, protein_prior_count,
                                         pseudocount)
            rng = np.random.default_rng(seed)
            # random pairing of the two groups' draws
            lfc = s1[rng.permutation(n_samples)] - s2[rng.permutation(n_samples)]
            table = self._de_table(lfc, s1, s2, mode, delta, fdr_target, all_stats, data,
                                   cells1, cells2)
            table["comparison"] = f"{name1} vs {name2}"
            table["group1"], table["group2"] = name1, name2
            tables.append(table)
        return pd.concat(tables) if len(tables) > 1 else tables[0]

    def _comparisons(self, adata, groupby, group1, group2, idx1, idx2):
        n = adata.n_obs

        def as_idx(sel):
            sel = np.asarray(sel)
            return np.flatnonzero(sel) if sel.dtype == bool else sel.astype(np.int64)

        if idx1 is not None:
            cells1 = as_idx(idx1)
            cells2 = np.setdiff1d(np.arange(n), cells1) if idx2 is None else as_idx(idx2)
            out = [("idx1", "rest" if idx2 is None else "idx2", cells1, cells2)]
        else:
            if groupby is None or groupby not in adata.obs:
                raise KeyError(f"groupby {groupby!r} not in adata.obs (columns: {list(adata.obs)})")
            labels = adata.obs[groupby].astype(str).to_numpy()
            cats = list(pd.unique(labels))
            groups = cats if group1 is None else (
                list(group1) if isinstance(group1, (list, tuple)) else [group1])
            out = []
            for g in map(str, groups):
                if g not in cats:
                    raise TotalVIDataError(f"group {g!r} not in adata.obs[{groupby!r}] ({cats[:10]})")
                cells1 = np.flatnonzero(labels == g)
                if group2 is None:
                    out.append((g, "rest", cells1, np.flatnonzero(labels != g)))
                else:
                    if str(group2) not in cats:
                        raise TotalVIDataError(f"group2 {group2!r} not in adata.obs[{groupby!r}]")
                    out.append((g, str(group2), cells1, np.flatnonzero(labels == str(group2))))
        for name1, name2, c1, c2 in out:
            if len(c1) == 0 or len(c2) == 0:
                raise TotalVIDataError(f"comparison {name1} vs {name2} has an empty group")
        return out

    def _de_table(self, lfc, s1, s2, mode, delta, fdr_target, all_stats, data, cells1, cells2):
        names = list(map(str, self.adata.var_names)) + list(self.registry["protein_names"])
        table = pd.DataFrame(index=pd.Index(names, name="feature"))
        if mode == "change":
            p = (np.abs(lfc) > delta).mean(0)
            table["proba_de"], table["proba_not_de"] = p, 1 - p
            table["bayes_factor"] = np.log(p + _EPS) - np.log(1 - p + _EPS)
        else:
            p = (lfc > 0).mean(0)
            table["proba_m1"], table["proba_m2"] = p, 1 - p
            table["bayes_factor"] = np.log(p + _EPS) - np.log(1 - p + _EPS)
        table["scale1"] = (2.0 ** s1).mean(0)
        table["scale2"] = (2.0 ** s2).mean(0)
        table["lfc_mean"] = lfc.mean(0)
        table["lfc_median"] = np.median(lfc, 0)
        table["lfc_std"] = lfc.std(0)
        table["lfc_min"], table["lfc_max"] = lfc.min(0), lfc.max(0)
        if mode == "change":
            table[f"is_de_fdr_{fdr_target}"] = fdr_calls(table["proba_de"].to_numpy(), fdr_target)
        if all_stats:
            for k, cells in (("1", cells1), ("2", cells2)):
                x = data.X[np.sort(cells)]
                y = data.Y[np.sort(cells)]
                lib = np.asarray(x.sum(1)).ravel()[:, None]
                xn = (x.multiply(1e4 / lib) if sp.issparse(x) else x * (1e4 / lib))
                ypn = y * (1e4 / np.maximum(y.sum(1, keepdims=True), 1))
                table[f"raw_mean{k}"] = np.concatenate([np.asarray(x.mean(0)).ravel(),
                                                        y.mean(0)])
                table[f"non_zeros_proportion{k}"] = np.concatenate(
                    [np.asarray((x > 0).mean(0)).ravel(), (y > 0).mean(0)])
                table[f"raw_normalized_mean{k}"] = np.concatenate(
                    [np.asarray(xn.mean(0)).ravel(), ypn.mean(0)])
        table["is_protein"] = np.arange(len(names)) >= self.module.n_genes
        return table
