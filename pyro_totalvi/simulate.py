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
) -> ad.AnnData:
    """Draw a CITE-seq data set from the totalVI generative process (Eqs. 1-14).

    Cells belong to ``n_groups`` well-separated clusters in ``z`` (Eq. 1 with group means).
    ``log rho`` is linear in ``z`` for a random ``de_fraction`` of genes and constant otherwise, so
    those genes are the planted differentially expressed ones; each protein is foreground in a
    random half of the groups (``pi`` low) and background elsewhere (``pi`` high).

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
                                  n_latent, de_fraction, chunk_size))
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
):
    """:func:`simulate`, one AnnData per ``chunk_size`` cells, all from the same parameters.

    For data sets too large to hold in memory: write each chunk to disk as it comes
    (``benchmarks/scale.py`` builds a million-cell ``.h5ad`` this way).
    """
    rng = np.random.default_rng(seed)
    G, T, K = n_genes, n_proteins, n_batches
    # Group centres far apart relative to the within-group spread of z.
    centres = rng.normal(0, 2.0, (n_groups, n_latent))
    de = rng.random(G) < de_fraction
    W = rng.normal(0, 0.6, (G, n_latent)) * de[:, None]  # only DE genes depend on z
    gene_base = rng.normal(0, 1.2, G)
    batch_gene = rng.normal(0, 0.25, (K, G)) if K > 1 else np.zeros((1, G))
    theta = np.exp(rng.normal(np.log(3.0), 0.5, G))
    lib_mu = np.log(2000.0) + rng.normal(0, 0.3, K)

    # Proteins: foreground pattern per group; pi is a smooth function of z through the
    # group-weighted pattern (a soft nearest-centre rule) so it stays a function of (z, s).
    foreground = rng.random((n_groups, T)) < 0.5
    log_fg_ratio = rng.uniform(np.log(5.0), np.log(20.0), T)  # alpha - 1 scale
    c = rng.normal(np.log(30.0), 0.6, T)[:, None] + rng.normal(0, 0.3, (1, K))  # c_t^T s
    d = np.full((T, K), 0.35)
    phi = np.exp(rng.normal(np.log(8.0), 0.3, T))
    group_log_rho = gene_base[:, None] + W @ centres.T
    group_log_rho -= np.log(np.exp(group_log_rho).sum(0, keepdims=True))

    groups = rng.integers(0, n_groups, n_cells)
    batches = rng.integers(0, K, n_cells)
    batch_names = [f"batch_{i}" for i in range(K)]
    group_names = [f"group_{i}" for i in range(n_groups)]
    protein_names = [f"protein_{t}" for t in range(T)]
    var = pd.DataFrame({"de": de}, index=[f"gene_{g}" for g in range(G)])
    for start in range(0, n_cells, chunk_size):
        g, b = groups[start : start + chunk_size], batches[start : start + chunk_size]
        n = len(g)
        z = centres[g] + rng.normal(0, 0.4, (n, n_latent))  # (1)
        logits = z @ W.T + gene_base + batch_gene[b]
        rho = np.exp(logits - logits.max(1, keepdims=True))
        rho /= rho.sum(1, keepdims=True)  # (2)
        # soft assignment of z to group centres gives pi and alpha as smooth functions of z
        dist2 = ((z[:, None, :] - centres[None]) ** 2).sum(-1)
        w = np.exp(-(dist2 - dist2.min(1, keepdims=True)) / 2.0)
        w /= w.sum(1, keepdims=True)
        fg = w @ foreground.astype(float)
        pi = 1 / (1 + np.exp(-(3.0 - 6.0 * fg)))  # (4): ~0.05 foreground, ~0.95 background
        alpha = 1 + np.exp(log_fg_ratio)[None] * (0.5 + fg)  # (3)
        lib = np.exp(rng.normal(lib_mu[b], 0.3))  # (5)
        x = _nb(rng, lib[:, None] * rho, theta[None])  # (10)
        beta = np.exp(rng.normal(c[:, b].T, d[:, b].T))  # (11)
        v = (rng.random((n, T)) < pi).astype(np.float32)  # (12)
        y = _nb(rng, v * beta + (1 - v) * beta * alpha, phi[None])  # (14)
        names = [f"cell_{i}" for i in range(start, start + n)]
        chunk = ad.AnnData(
            X=sp.csr_matrix(x),
            obs=pd.DataFrame(
                {
                    "batch": pd.Categorical([f"batch_{i}" for i in b], categories=batch_names),
                    "group": pd.Categorical([f"group_{i}" for i in g], categories=group_names),
                    "true_library": lib,
                },
                index=names,
            ),
            var=var,
        )
        chunk.obsm["protein_expression"] = pd.DataFrame(y, index=names, columns=protein_names)
        chunk.obsm["true_z"] = z.astype(np.float32)
        chunk.obsm["true_v"] = v
        chunk.obsm["true_beta"] = beta.astype(np.float32)
        chunk.obsm["true_pi"] = pi.astype(np.float32)
        chunk.varm["true_group_log_rho"] = group_log_rho.astype(np.float32)
        chunk.uns["true_group_foreground"] = foreground
        # A protein is planted-DE when it is foreground in some groups but not in others.
        chunk.uns["protein_de"] = foreground.any(0) & ~foreground.all(0)
        yield chunk
