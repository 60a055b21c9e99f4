"""Simulate CITE-seq data from totalVI's generative process, with the truth kept alongside.

The networks f_rho, g_alpha, h_pi are replaced by simple known functions of z so that the ground
truth (groups, foreground/background indicator v, background beta, differential features) is
explicit. Cells are generated in chunks and RNA is stored sparse, so millions of cells fit.
"""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["simulate"]


def _nb(rng: np.random.Generator, mu: np.ndarray, theta: np.ndarray) -> np.ndarray:
    # NB(mu, theta) as Gamma-Poisson.
    return rng.poisson(rng.gamma(theta, mu / theta)).astype(np.float32)


def simulate(
    n_cells: int = 3000,
    n_genes: int = 500,
    n_proteins: int = 20,
    n_batches: int = 1,
    n_groups: int = 5,
    seed: int = 0,
    n_latent: int = 10,
    de_fraction: float = 0.2,
    chunk_size: int = 10000,
    rna_group_signal: bool = True,
    protein_group_signal: bool = True,
) -> ad.AnnData:
    """Draw a CITE-seq data set from the totalVI generative process (Eqs. 1-14).

    Cells belong to ``n_groups`` well-separated clusters in ``z`` (Eq. 1 with group means).
    ``log rho`` is linear in ``z`` for a random ``de_fraction`` of genes and constant otherwise, so
    those genes are the planted differentially expressed ones; each protein is foreground in a
    random half of the groups (``pi`` low) and background elsewhere (``pi`` high).

    ``rna_group_signal=False`` makes the RNA independent of ``z`` (no planted DE gene: every cell
    draws from the same ``rho`` up to its batch); ``protein_group_signal=False`` gives every
    group the foreground pattern of group 0 (no planted DE protein: ``pi`` and ``alpha`` are the
    same in every cell). Either leaves the groups distinguishable by the other modality only: a
    known answer for :meth:`~pyro_totalvi.TOTALVI.get_modality_contributions`. The same
    ``seed`` gives the same groups, batches, ``z`` and library sizes with either option (and the
    same RNA with ``protein_group_signal=False``); the defaults give exactly the data of earlier
    versions.

    Returns
    -------
    AnnData with
        ``X`` (CSR float32 RNA counts), ``obsm["protein_expression"]`` (DataFrame of counts),
        ``obs["batch"]``, ``obs["group"]`` (categorical), and the truth: ``obsm["true_z"]``,
        ``obsm["true_v"]`` (1 = background), ``obsm["true_beta"]``, ``obsm["true_pi"]``,
        ``obs["true_library"]``, ``var["de"]`` (planted DE gene), ``uns["protein_de"]``
        (planted DE protein), ``varm["true_group_log_rho"]`` and
        ``uns["true_group_foreground"]`` (groups x proteins).
    """
    chunks = list(simulate_chunks(n_cells, n_genes, n_proteins, n_batches, n_groups, seed,
                                  n_latent, de_fraction, chunk_size, rna_group_signal,
                                  protein_group_signal))
    if len(chunks) == 1:
        return chunks[0]
    adata = ad.concat(chunks, merge="same")
    adata.uns = chunks[0].uns
    adata.X = adata.X.tocsr()
    return adata


def simulate_chunks(
    n_cells: int,
    n_genes: int = 500,
    n_proteins: int = 20,
    n_batches: int = 1,
    n_groups: int = 5,
    seed: int = 0,
    n_latent: int = 10,
    de_fraction: float = 0.2,
    chunk_size: int = 10000,
    rna_group_signal: bool = True,
    protein_group_signal: bool = True,
):
    """:func:`simulate`, one AnnData per ``chunk_size`` cells, all from the same parameters.

    For data sets too large to hold in memory: write each chunk to disk as it comes
    (``benchmarks/scale.py`` builds a million-cell ``.h5ad`` this way).
    """
    rng = np.random.default_rng(seed)
    p = _parameters(rng, n_genes, n_proteins, n_batches, n_groups, n_latent, de_fraction)
    if not rna_group_signal:  # after all draws of _parameters: the same random stream
        p["W"], p["de"] = np.zeros_like(p["W"]), np.zeros_like(p["de"])
        base = p["gene_base"] - np.log(np.exp(p["gene_base"]).sum())
        p["group_log_rho"] = np.repeat(base[:, None], n_groups, axis=1)
    if not protein_group_signal:
        p["foreground"] = np.broadcast_to(p["foreground"][:1], p["foreground"].shape).copy()
    groups = rng.integers(0, n_groups, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    for start in range(0, n_cells, chunk_size):
        yield _chunk(rng, p, groups[start : start + chunk_size],
                     batches[start : start + chunk_size], start)


def _parameters(rng, G, T, K, n_groups, n_latent, de_fraction) -> dict:
    """The simulator's global parameters: group centres, gene and protein effects, priors."""
    p = {"K": K, "n_groups": n_groups, "n_latent": n_latent}
    # Group centres far apart relative to the within-group spread of z.
    p["centres"] = rng.normal(0, 2.0, (n_groups, n_latent))
    p["de"] = de = rng.random(G) < de_fraction
    p["W"] = rng.normal(0, 0.6, (G, n_latent)) * de[:, None]  # only DE genes depend on z
    p["gene_base"] = rng.normal(0, 1.2, G)
    p["batch_gene"] = rng.normal(0, 0.25, (K, G)) if K > 1 else np.zeros((1, G))
    p["theta"] = np.exp(rng.normal(np.log(3.0), 0.5, G))
    p["lib_mu"] = np.log(2000.0) + rng.normal(0, 0.3, K)
    # Proteins: foreground pattern per group; pi is a smooth function of z through the
    # group-weighted pattern (a soft nearest-centre rule) so it stays a function of (z, s).
    p["foreground"] = rng.random((n_groups, T)) < 0.5
    p["log_fg_ratio"] = rng.uniform(np.log(5.0), np.log(20.0), T)  # alpha - 1 scale
    p["c"] = rng.normal(np.log(30.0), 0.6, T)[:, None] + rng.normal(0, 0.3, (1, K))  # c_t^T s
    p["d"] = np.full((T, K), 0.35)
    p["phi"] = np.exp(rng.normal(np.log(8.0), 0.3, T))
    log_rho = p["gene_base"][:, None] + p["W"] @ p["centres"].T
    p["group_log_rho"] = log_rho - np.log(np.exp(log_rho).sum(0, keepdims=True))
    return p


def _chunk(rng, p: dict, g: np.ndarray, b: np.ndarray, start: int) -> ad.AnnData:
    """Cells ``start, start + 1, ...`` of groups ``g`` and batches ``b``, drawn by Eqs. (1)-(14)."""
    n, (G, T) = len(g), (len(p["de"]), len(p["phi"]))
    z = p["centres"][g] + rng.normal(0, 0.4, (n, p["n_latent"]))  # (1)
    logits = z @ p["W"].T + p["gene_base"] + p["batch_gene"][b]
    rho = np.exp(logits - logits.max(1, keepdims=True))
    rho /= rho.sum(1, keepdims=True)  # (2)
    # soft assignment of z to group centres gives pi and alpha as smooth functions of z
    dist2 = ((z[:, None, :] - p["centres"][None]) ** 2).sum(-1)
    w = np.exp(-(dist2 - dist2.min(1, keepdims=True)) / 2.0)
    w /= w.sum(1, keepdims=True)
    fg = w @ p["foreground"].astype(float)
    pi = 1 / (1 + np.exp(-(3.0 - 6.0 * fg)))  # (4): ~0.05 foreground, ~0.95 background
    alpha = 1 + np.exp(p["log_fg_ratio"])[None] * (0.5 + fg)  # (3)
    lib = np.exp(rng.normal(p["lib_mu"][b], 0.3))  # (5)
    x = _nb(rng, lib[:, None] * rho, p["theta"][None])  # (10)
    beta = np.exp(rng.normal(p["c"][:, b].T, p["d"][:, b].T))  # (11)
    v = (rng.random((n, T)) < pi).astype(np.float32)  # (12)
    y = _nb(rng, v * beta + (1 - v) * beta * alpha, p["phi"][None])  # (14)
    names = [f"cell_{i}" for i in range(start, start + n)]
    batch_names = [f"batch_{i}" for i in range(p["K"])]
    group_names = [f"group_{i}" for i in range(p["n_groups"])]
    obs = pd.DataFrame({
        "batch": pd.Categorical([batch_names[i] for i in b], categories=batch_names),
        "group": pd.Categorical([group_names[i] for i in g], categories=group_names),
        "true_library": lib}, index=names)
    var = pd.DataFrame({"de": p["de"]}, index=[f"gene_{i}" for i in range(G)])
    chunk = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    chunk.obsm["protein_expression"] = pd.DataFrame(
        y, index=names, columns=[f"protein_{t}" for t in range(T)])
    chunk.obsm["true_z"] = z.astype(np.float32)
    chunk.obsm["true_v"] = v
    chunk.obsm["true_beta"] = beta.astype(np.float32)
    chunk.obsm["true_pi"] = pi.astype(np.float32)
    chunk.varm["true_group_log_rho"] = p["group_log_rho"].astype(np.float32)
    chunk.uns["true_group_foreground"] = p["foreground"]
    # A protein is planted-DE when it is foreground in some groups but not in others.
    chunk.uns["protein_de"] = p["foreground"].any(0) & ~p["foreground"].all(0)
    return chunk
