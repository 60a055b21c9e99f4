"""From AnnData to minibatch tensors: registration, validation, empirical priors.

The registry lives in ``adata.uns["_pyro_totalvi"]`` (plain strings and lists, so it survives
``write_h5ad``). RNA stays sparse: minibatches are cut from the CSR matrix row by row and densified
one minibatch at a time.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

logger = logging.getLogger("pyro_totalvi")

REGISTRY_KEY = "_pyro_totalvi"

__all__ = [
    "REGISTRY_KEY",
    "CiteData",
    "register_anndata",
    "library_log_stats",
    "protein_background_prior",
]


class TotalVIDataError(ValueError):
    """Invalid input data; the message names the offending column, batch, gene, protein or cell."""


# ----------------------------------------------------------------------------------------------
# Validation helpers
def _first_bad(values: np.ndarray, names_rows, names_cols, what: str, kind: str):
    rows, cols = np.nonzero(values)
    r, c = rows[0], cols[0]
    return TotalVIDataError(
        f"{what} contains {kind} values ({len(rows)} entries), e.g. cell {names_rows[r]!r}, "
        f"feature {names_cols[c]!r}. totalVI needs raw non-negative UMI counts."
    )


def _check_counts(m, row_names, col_names, what: str, non_integer: str = "warn") -> None:
    """Raise on NaN, infinite or negative entries; warn (or raise) on non-integers."""
    if sp.issparse(m):
        coo = m.tocoo(copy=False)
        data, rows, cols = coo.data, coo.row, coo.col
    else:
        data = np.asarray(m)
        rows = cols = None
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise TotalVIDataError(f"{what} has dtype {data.dtype}; expected numeric counts.")
    for kind, bad in (("NaN", np.isnan), ("infinite", np.isinf), ("negative", lambda a: a < 0)):
        if data.dtype.kind == "f" or kind == "negative":
            mask = bad(data)
            if mask.any():
                if rows is None:
                    raise _first_bad(mask, row_names, col_names, what, kind)
                i = np.flatnonzero(mask)[0]
                raise TotalVIDataError(
                    f"{what} contains {kind} values ({int(mask.sum())} entries), e.g. cell "
                    f"{row_names[rows[i]]!r}, feature {col_names[cols[i]]!r}. totalVI needs raw "
                    "non-negative UMI counts."
                )
    if data.dtype.kind == "f":
        frac = data != np.round(data)
        if frac.any():
            msg = (f"{what} contains non-integer values ({int(frac.sum())} entries); totalVI "
                   "expects raw UMI counts, not normalised data.")
            if non_integer == "error":
                raise TotalVIDataError(msg)
            warnings.warn(msg, UserWarning, stacklevel=4)


def _get_rna(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})")
    return adata.layers[layer]


def _get_protein(adata: AnnData, key: str) -> tuple[np.ndarray, list[str]]:
    """Protein counts as float32 (cells x proteins) and their names, checked against obs_names."""
    if key not in adata.obsm:
        raise KeyError(
            f"protein_expression_obsm_key {key!r} not in adata.obsm "
            f"(available: {list(adata.obsm.keys())})"
        )
    pro = adata.obsm[key]
    if isinstance(pro, pd.DataFrame):
        if not pro.index.equals(adata.obs_names):
            diff = np.flatnonzero(np.asarray(pro.index) != np.asarray(adata.obs_names))
            cell = pro.index[diff[0]] if len(diff) else "?"
            raise TotalVIDataError(
                f"adata.obsm[{key!r}] cell names differ from adata.obs_names (first mismatch: "
                f"{cell!r} at row {diff[0] if len(diff) else '?'}); align the protein table to "
                "the cells first."
            )
        names = [str(c) for c in pro.columns]
        values = pro.to_numpy()
    else:
        values = pro.toarray() if sp.issparse(pro) else np.asarray(pro)
        names = [f"protein_{i}" for i in range(values.shape[1])]
    if values.ndim != 2 or values.shape[1] == 0:
        raise TotalVIDataError(f"adata.obsm[{key!r}] has no protein columns.")
    return values, names


# ----------------------------------------------------------------------------------------------
def register_anndata(
    adata: AnnData,
    protein_expression_obsm_key: str = "protein_expression",
    batch_key: str | None = None,
    layer: str | None = None,
    non_integer: str = "warn",
) -> dict:
    """Validate ``adata`` and write the registry ``adata.uns["_pyro_totalvi"]``.

    Only that one ``uns`` entry is written; counts and ``obs`` are left untouched.
    """
    if adata.n_obs == 0:
        raise TotalVIDataError("adata has no cells (n_obs == 0).")
    if adata.n_vars == 0:
        raise TotalVIDataError("adata has no genes (n_vars == 0).")
    if adata.isbacked:
        raise TotalVIDataError("backed AnnData is not supported by setup_anndata; load it in memory")
    X = _get_rna(adata, layer)
    what = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    _check_counts(X, adata.obs_names, adata.var_names, f"RNA counts ({what})", non_integer)
    y, protein_names = _get_protein(adata, protein_expression_obsm_key)
    _check_counts(y, adata.obs_names, protein_names,
                  f"protein counts (adata.obsm[{protein_expression_obsm_key!r}])", non_integer)
    totals = np.asarray(X.sum(axis=1)).ravel()
    empty = np.flatnonzero(totals <= 0)
    if len(empty):
        raise TotalVIDataError(
            f"{len(empty)} cells have zero total RNA counts (e.g. {adata.obs_names[empty[0]]!r}); "
            "their library size is undefined. Filter them first, e.g. "
            "adata = adata[adata.X.sum(1).A1 > 0].copy()"
        )
    if batch_key is None:
        categories = ["0"]
    else:
        if batch_key not in adata.obs:
            raise KeyError(f"batch_key {batch_key!r} not in adata.obs (columns: {list(adata.obs)})")
        col = adata.obs[batch_key]
        if col.isna().any():
            cell = adata.obs_names[np.flatnonzero(col.isna().to_numpy())[0]]
            raise TotalVIDataError(f"adata.obs[{batch_key!r}] has missing values, e.g. cell {cell!r}")
        cats = col.cat.categories if isinstance(col.dtype, pd.CategoricalDtype) else np.unique(col)
        present = set(col.astype(str))
        categories = [str(c) for c in cats if str(c) in present]
    registry = {
        "protein_expression_obsm_key": protein_expression_obsm_key,
        "batch_key": batch_key,
        "layer": layer,
        "batch_categories": categories,
        "protein_names": protein_names,
    }
    adata.uns[REGISTRY_KEY] = registry
    return registry


def batch_codes(adata: AnnData, registry: dict) -> np.ndarray:
    """Integer batch code per cell; raises on categories unseen at registration."""
    key = registry["batch_key"]
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    if key not in adata.obs:
        raise KeyError(f"batch_key {key!r} not in adata.obs (columns: {list(adata.obs)})")
    values = adata.obs[key].astype(str).to_numpy()
    lookup = {c: i for i, c in enumerate(registry["batch_categories"])}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise TotalVIDataError(
            f"adata.obs[{key!r}] has categories unseen at training time: {unknown}; "
            f"known: {registry['batch_categories']}"
        )
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


@dataclass
class Minibatch:
    """Tensors of one minibatch, in the order of :meth:`TotalVIModule.model`'s arguments."""

    x: torch.Tensor
    y: torch.Tensor
    s: torch.Tensor
    log_library: torch.Tensor
    protein_mask: torch.Tensor | None
    idx: torch.Tensor

    def args(self):
        return (self.x, self.y, self.s, self.log_library, None, self.protein_mask)


class CiteData:
    """Registered CITE-seq data as arrays ready for slicing into minibatches.

    Parameters
    ----------
    adata
        AnnData registered with :func:`register_anndata` (or any AnnData with the same genes,
        proteins and batch categories as ``registry``).
    registry
        The registry to check ``adata`` against; default ``adata.uns["_pyro_totalvi"]``.
    """

    def __init__(self, adata: AnnData, registry: dict | None = None):
        if registry is None:
            if REGISTRY_KEY not in adata.uns:
                raise TotalVIDataError(
                    "adata is not registered: call TOTALVI.setup_anndata(adata, ...) first."
                )
            registry = dict(adata.uns[REGISTRY_KEY])
        self.registry = registry
        X = _get_rna(adata, registry["layer"])
        self.X = X.tocsr() if sp.issparse(X) else np.asarray(X)
        y, names = _get_protein(adata, registry["protein_expression_obsm_key"])
        if list(names) != list(registry["protein_names"]):
            raise TotalVIDataError(
                f"proteins differ from the training data: expected {len(registry['protein_names'])}"
                f" proteins {list(registry['protein_names'])[:5]}..., got {len(names)} "
                f"{list(names)[:5]}..."
            )
        self.Y = np.ascontiguousarray(y, dtype=np.float32)
        self.batch = batch_codes(adata, registry)
        self.n_batches = len(registry["batch_categories"])
        totals = np.asarray(self.X.sum(axis=1)).ravel().astype(np.float64)
        self.log_library = np.log(np.maximum(totals, 1.0)).astype(np.float32)
        # A protein with zero counts in every cell of a batch was not measured there
        # (as scvi-tools decides); it is masked out of that batch's likelihood.
        measured = np.ones((self.n_batches, self.Y.shape[1]), dtype=bool)
        for b in np.unique(self.batch):
            measured[b] = self.Y[self.batch == b].sum(axis=0) > 0
        self.protein_measured = measured
        self._eye = torch.eye(self.n_batches)

    @property
    def n_obs(self) -> int:
        return self.Y.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def n_proteins(self) -> int:
        return self.Y.shape[1]

    def minibatch(self, idx: np.ndarray) -> Minibatch:
        """Dense tensors for the cells ``idx`` (sorted for cache-friendly CSR row access)."""
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        rows = self.X[idx]
        x = rows.toarray() if sp.issparse(rows) else rows
        x = torch.from_numpy(np.asarray(x, dtype=np.float32))
        batch = self.batch[idx]
        mask = None
        if not self.protein_measured.all():
            mask = torch.from_numpy(self.protein_measured[batch])
        return Minibatch(
            x=x,
            y=torch.from_numpy(self.Y[idx]),
            s=self._eye[torch.from_numpy(batch)],
            log_library=torch.from_numpy(self.log_library[idx]).unsqueeze(-1),
            protein_mask=mask,
            idx=torch.from_numpy(idx),
        )


def library_log_stats(data: CiteData) -> tuple[np.ndarray, np.ndarray]:
    """Per-batch mean and variance of the log library size: l_mu, l_sigma^2 of Eq. (5)."""
    means = np.zeros(data.n_batches, dtype=np.float32)
    variances = np.ones(data.n_batches, dtype=np.float32)
    for b in range(data.n_batches):
        v = data.log_library[data.batch == b]
        if len(v):
            means[b] = v.mean()
            variances[b] = max(v.var(), 1e-4)
    return means, variances


def protein_background_prior(
    data: CiteData, n_cells: int = 200, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Initial c_t, exp(d_t) of Eq. (11), shape ``(T, K)``, from the data (as scvi-tools).

    For (up to ``n_cells``) cells of each batch, a two-component Gaussian mixture over the cell's
    ``log(y + 1)`` across its measured proteins separates the background level of that cell from
    its foreground; the mean and standard deviation of the lower component, aggregated over cells,
    initialise every protein of the batch. A per-protein fit would call the upper half of a purely
    background antibody (an isotype control) "foreground".
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    T, K = data.n_proteins, data.n_batches
    mean, scale = np.zeros((T, K), np.float32), np.ones((T, K), np.float32)
    for b in range(K):
        cells = np.flatnonzero(data.batch == b)
        measured = data.protein_measured[b]
        if len(cells) == 0 or measured.sum() < 5:  # too few proteins to tell the two apart
            mean[:, b], scale[:, b] = 0.0, 1.0
            continue
        if len(cells) > n_cells:
            cells = rng.choice(cells, n_cells, replace=False)
        mus, sds = [], []
        for c in cells:
            v = np.log1p(data.Y[c, measured]).reshape(-1, 1)
            if len(np.unique(v)) < 2:
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gmm = GaussianMixture(2, random_state=seed).fit(v)
            lower = int(np.argmin(gmm.means_.ravel()))
            mus.append(gmm.means_.ravel()[lower])
            sds.append(np.sqrt(gmm.covariances_.ravel()[lower]))
        if mus:
            mean[:, b] = np.mean(mus)
            # floor: a cell whose background is one repeated count gives a point mass
            scale[:, b] = max(float(np.sqrt(np.mean(np.square(sds)))), 0.05)
    return mean, scale
