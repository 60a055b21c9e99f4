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
    foreground_fraction: float = 0.5,
    foreground_ratio: tuple[float, float] = (5.0, 20.0),
    background_cell_sd: float = 0.0,
    n_isotypes: int = 0, n_empty_droplets: int = 0, droplet_background_ratio: float = 0.5,
):
    """Draw a CITE-seq data set from the totalVI generative process (Eqs. 1-14).

    Cells belong to ``n_groups`` well-separated clusters in ``z`` (Eq. 1 with group means).
    ``log rho`` is linear in ``z`` for a random ``de_fraction`` of genes and constant otherwise, so
    those genes are the planted differentially expressed ones; each protein is foreground in a
    random ``foreground_fraction`` of the groups (``pi`` about 0.05) and background elsewhere
    (``pi`` about 0.95), so about ``0.05 + 0.9 * foreground_fraction`` of the cells are positive.

    Parameters
    ----------
    rna_group_signal, protein_group_signal
        ``False``: the RNA is independent of ``z`` (no planted DE gene), or every group has
        group 0's foreground pattern (no planted DE protein), so that only the other modality
        tells the groups apart (a known answer for
        :meth:`~pyro_totalvi.TOTALVI.get_modality_contributions`); the same ``seed`` gives the
        same groups, batches, ``z`` and library sizes either way.
    foreground_fraction
        Probability that a group expresses a protein (0: background in every group, up to the
        5 % of cells drawn foreground by ``pi``; 1: foreground everywhere).
    foreground_ratio
        Range of a per-protein factor ``r`` (log-uniform): ``alpha = 1 + r (0.5 + f)``, ``f`` in
        [0, 1] the cell's (soft) membership of the groups that express the protein. E.g.
        ``(1.5, 3.0)``, a weak foreground: alpha 1.75-2.5 in other groups, 3.25-5.5 in those.
    background_cell_sd
        SD of a per-cell shift ``b_n ~ Normal(0, sd)`` of ``log beta`` shared by every protein
        of the cell (non-specific binding); 0: none.
    n_isotypes
        Isotype-control columns ``isotype_0, ...`` appended to the proteins: background only
        (``v = 1``), with the same per-cell shift; named in ``uns["isotype_controls"]``.
    n_empty_droplets, droplet_background_ratio
        Also draw this many empty droplets (ambient antibody only): ``log beta ~ Normal(c_t^T s +
        log droplet_background_ratio, d_t^T s)``, without the per-cell shift.

    Every option draws from its own random stream: the defaults give the data of earlier versions.

    Returns
    -------
    AnnData with
        ``X`` (CSR float32 RNA counts), ``obsm["protein_expression"]`` (DataFrame of counts),
        ``obs["batch"]``, ``obs["group"]`` (categorical), and the truth: ``obsm["true_z"]``,
        ``obsm["true_v"]`` (1 = background), ``obsm["true_beta"]``, ``obsm["true_pi"]``,
        ``obsm["true_alpha"]``, ``uns["true_protein_prior"]`` (``c``, ``d`` of Eq. 11, proteins x
        batches; ``phi``), ``obs["true_library"]``, ``var["de"]`` (planted DE gene),
        ``uns["protein_de"]`` (planted DE protein), ``varm["true_group_log_rho"]`` and
        ``uns["true_group_foreground"]`` (groups x proteins); with ``background_cell_sd``,
        ``obs["true_background_shift"]``. With ``n_empty_droplets``, the pair
        ``(adata, droplets)``: ``droplets`` is an AnnData of the droplets (ambient RNA counts in
        ``X``, ``obsm["protein_expression"]``, ``obs["batch"]``, ``obsm["true_beta"]``).
    """
    options = dict(foreground_fraction=foreground_fraction, foreground_ratio=foreground_ratio,
                   background_cell_sd=background_cell_sd, n_isotypes=n_isotypes,
                   n_empty_droplets=n_empty_droplets, droplet_background_ratio=droplet_background_ratio)
    chunks = list(simulate_chunks(n_cells, n_genes, n_proteins, n_batches, n_groups, seed,
                                  n_latent, de_fraction, chunk_size, rna_group_signal,
                                  protein_group_signal, **options))
    droplets = chunks.pop() if n_empty_droplets else None
    if len(chunks) == 1:
        adata = chunks[0]
    else:
        adata = ad.concat(chunks, merge="same")
        adata.uns = chunks[0].uns
        adata.X = adata.X.tocsr()
    return adata if droplets is None else (adata, droplets)


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
    **options,
):
    """:func:`simulate`, one AnnData per ``chunk_size`` cells, all from the same parameters.

    For data sets too large to hold in memory: write each chunk to disk as it comes
    (``benchmarks/scale.py`` builds a million-cell ``.h5ad`` this way). ``options`` are
    :func:`simulate`'s background options; with ``n_empty_droplets``, the droplets' AnnData
    comes last.
    """
    rng = np.random.default_rng(seed)
    p = _parameters(rng, n_genes, n_proteins, n_batches, n_groups, n_latent, de_fraction,
                    options.get("foreground_fraction", 0.5),
                    options.get("foreground_ratio", (5.0, 20.0)))
    if not rna_group_signal:  # after all draws of _parameters: the same random stream
        p["W"], p["de"] = np.zeros_like(p["W"]), np.zeros_like(p["de"])
        base = p["gene_base"] - np.log(np.exp(p["gene_base"]).sum())
        p["group_log_rho"] = np.repeat(base[:, None], n_groups, axis=1)
    if not protein_group_signal:
        p["foreground"] = np.broadcast_to(p["foreground"][:1], p["foreground"].shape).copy()
    # the background options draw from a stream of their own: the default output is unchanged
    p["extra"] = _background_parameters(np.random.default_rng([seed, 13]), p, **options)
    groups = rng.integers(0, n_groups, n_cells)
    batches = rng.integers(0, n_batches, n_cells)
    for start in range(0, n_cells, chunk_size):
        yield _chunk(rng, p, groups[start : start + chunk_size],
                     batches[start : start + chunk_size], start)
    if p["extra"]["n_empty_droplets"]:
        yield _droplets(p)


def _parameters(rng, G, T, K, n_groups, n_latent, de_fraction, foreground_fraction=0.5,
                foreground_ratio=(5.0, 20.0)) -> dict:
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
    p["foreground"] = rng.random((n_groups, T)) < foreground_fraction
    p["log_fg_ratio"] = rng.uniform(*np.log(foreground_ratio), T)  # alpha - 1 scale
    p["c"] = rng.normal(np.log(30.0), 0.6, T)[:, None] + rng.normal(0, 0.3, (1, K))  # c_t^T s
    p["d"] = np.full((T, K), 0.35)
    p["phi"] = np.exp(rng.normal(np.log(8.0), 0.3, T))
    log_rho = p["gene_base"][:, None] + p["W"] @ p["centres"].T
    p["group_log_rho"] = log_rho - np.log(np.exp(log_rho).sum(0, keepdims=True))
    return p


def _background_parameters(rng, p: dict, foreground_fraction=0.5, foreground_ratio=(5.0, 20.0),
                           background_cell_sd=0.0, n_isotypes=0, n_empty_droplets=0,
                           droplet_background_ratio=0.5) -> dict:
    """Parameters of the background options (isotypes, per-cell shift, empty droplets)."""
    K = p["K"]
    extra = {"rng": rng, "cell_sd": float(background_cell_sd), "n_isotypes": int(n_isotypes),
             "n_empty_droplets": int(n_empty_droplets),
             "droplet_log_ratio": float(np.log(droplet_background_ratio))}
    if n_isotypes:  # ambient levels in the range of the other proteins' backgrounds
        extra["c"] = rng.normal(np.log(15.0), 0.5, n_isotypes)[:, None] + rng.normal(0, 0.3, (1, K))
        extra["d"] = np.full((n_isotypes, K), 0.35)
        extra["phi"] = np.exp(rng.normal(np.log(8.0), 0.3, n_isotypes))
    return extra


def _isotype_counts(extra: dict, b: np.ndarray, shift: np.ndarray) -> tuple[np.ndarray, ...]:
    """Background-only counts and backgrounds of the isotype controls for cells in batches ``b``."""
    rng = extra["rng"]
    beta = np.exp(rng.normal(extra["c"][:, b].T, extra["d"][:, b].T) + shift[:, None])
    return _nb(rng, beta, extra["phi"][None]), beta


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
    extra = p["extra"]
    shift = np.zeros(n)
    if extra["cell_sd"]:  # non-specific binding shared by the proteins of a cell
        shift = extra["rng"].normal(0.0, extra["cell_sd"], n)
        beta = beta * np.exp(shift)[:, None]
    v = (rng.random((n, T)) < pi).astype(np.float32)  # (12)
    y = _nb(rng, v * beta + (1 - v) * beta * alpha, p["phi"][None])  # (14)
    protein_names = [f"protein_{t}" for t in range(T)]
    prior = {"c": p["c"], "d": p["d"], "phi": p["phi"]}
    if extra["n_isotypes"]:
        y_iso, beta_iso = _isotype_counts(extra, b, shift)
        y, beta = np.hstack([y, y_iso]), np.hstack([beta, beta_iso])
        v = np.hstack([v, np.ones_like(y_iso)])
        pi = np.hstack([pi, np.ones_like(y_iso)])
        alpha = np.hstack([alpha, np.ones_like(y_iso)])
        prior = {k: np.concatenate([prior[k], extra[k]]) for k in prior}
        protein_names += [f"isotype_{i}" for i in range(extra["n_isotypes"])]
    names = [f"cell_{i}" for i in range(start, start + n)]
    batch_names = [f"batch_{i}" for i in range(p["K"])]
    group_names = [f"group_{i}" for i in range(p["n_groups"])]
    obs = pd.DataFrame({
        "batch": pd.Categorical([batch_names[i] for i in b], categories=batch_names),
        "group": pd.Categorical([group_names[i] for i in g], categories=group_names),
        "true_library": lib}, index=names)
    var = pd.DataFrame({"de": p["de"]}, index=[f"gene_{i}" for i in range(G)])
    chunk = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    chunk.obsm["protein_expression"] = pd.DataFrame(y, index=names, columns=protein_names)
    chunk.obsm["true_z"] = z.astype(np.float32)
    chunk.obsm["true_v"] = v
    chunk.obsm["true_beta"] = beta.astype(np.float32)
    chunk.obsm["true_pi"] = pi.astype(np.float32)
    chunk.obsm["true_alpha"] = alpha.astype(np.float32)
    chunk.uns["true_protein_prior"] = prior
    chunk.varm["true_group_log_rho"] = p["group_log_rho"].astype(np.float32)
    chunk.uns["true_group_foreground"] = p["foreground"]
    # A protein is planted-DE when it is foreground in some groups but not in others.
    chunk.uns["protein_de"] = p["foreground"].any(0) & ~p["foreground"].all(0)
    if extra["cell_sd"]:
        chunk.obs["true_background_shift"] = shift.astype(np.float32)
    if extra["n_isotypes"]:
        chunk.uns["isotype_controls"] = protein_names[T:]
    return chunk


def _droplets(p: dict) -> ad.AnnData:
    """Empty droplets: ambient protein counts at ``droplet_background_ratio`` times the cells'
    background prior (no per-cell shift, no foreground), and a few ambient RNA counts."""
    extra, rng, K = p["extra"], p["extra"]["rng"], p["K"]
    n = extra["n_empty_droplets"]
    b = rng.integers(0, K, n)
    c, d, phi = p["c"], p["d"], p["phi"]
    names = [f"protein_{t}" for t in range(len(phi))]
    if extra["n_isotypes"]:
        c, d = np.vstack([c, extra["c"]]), np.vstack([d, extra["d"]])
        phi = np.concatenate([phi, extra["phi"]])
        names += [f"isotype_{i}" for i in range(extra["n_isotypes"])]
    beta = np.exp(rng.normal(c[:, b].T + extra["droplet_log_ratio"], d[:, b].T))
    y = _nb(rng, beta, phi[None])
    rho = np.exp(p["gene_base"] - p["gene_base"].max())
    x = rng.poisson(20.0 * rho / rho.sum(), (n, len(rho))).astype(np.float32)
    batch_names = [f"batch_{i}" for i in range(K)]
    obs_names = [f"droplet_{i}" for i in range(n)]
    obs = pd.DataFrame({"batch": pd.Categorical([batch_names[i] for i in b],
                                                categories=batch_names)}, index=obs_names)
    droplets = ad.AnnData(X=sp.csr_matrix(x), obs=obs,
                          var=pd.DataFrame(index=[f"gene_{i}" for i in range(len(rho))]))
    droplets.obsm["protein_expression"] = pd.DataFrame(y, index=obs_names, columns=names)
    droplets.obsm["true_beta"] = beta.astype(np.float32)
    return droplets
