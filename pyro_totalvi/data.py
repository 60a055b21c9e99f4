"""From AnnData to minibatch tensors: registration, validation, empirical priors.

The registry lives in ``adata.uns["_pyro_totalvi"]`` (plain strings and lists, so it survives
``write_h5ad``). RNA stays sparse: minibatches are cut from the CSR matrix row by row and densified
one minibatch at a time.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field, fields

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from .distributions import with_nonzero

logger = logging.getLogger("pyro_totalvi")

REGISTRY_KEY = "_pyro_totalvi"

__all__ = [
    "REGISTRY_KEY",
    "CiteData",
    "DropletBatch",
    "DropletData",
    "register_anndata",
    "register_obs_codes",
    "library_log_stats",
    "protein_background_prior",
    "covariate_matrix",
    "anndata_from_mudata",
    "is_mudata",
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
    where = None
    if sp.issparse(m):
        if m.format not in ("csr", "csc"):
            m = m.tocsr()
        data = m.data

        def where(i: int) -> tuple[int, int]:
            # Position of stored entry i, found only for an offending entry: building row and
            # column arrays for every entry (tocoo) would double the memory of a large matrix.
            major = int(np.searchsorted(m.indptr, i, side="right")) - 1
            return (major, int(m.indices[i])) if m.format == "csr" else (int(m.indices[i]), major)
    else:
        data = np.asarray(m)
    data = np.asarray(data)
    if data.dtype.kind not in "biuf":
        raise TotalVIDataError(f"{what} has dtype {data.dtype}; expected numeric counts.")
    for kind, bad in (("NaN", np.isnan), ("infinite", np.isinf), ("negative", lambda a: a < 0)):
        if data.dtype.kind == "f" or kind == "negative":
            mask = bad(data)
            if mask.any():
                if where is None:
                    raise _first_bad(mask, row_names, col_names, what, kind)
                r, c = where(int(np.flatnonzero(mask)[0]))
                raise TotalVIDataError(
                    f"{what} contains {kind} values ({int(mask.sum())} entries), e.g. cell "
                    f"{row_names[r]!r}, feature {col_names[c]!r}. totalVI needs raw "
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


def _uniform_index_csr(X: sp.spmatrix) -> sp.csr_matrix:
    """``X`` as CSR whose ``indices`` and ``indptr`` share one dtype (the user's matrix is not
    modified). Files written by other tools may pair int64 ``indptr`` with int32 ``indices``;
    scipy then converts the whole index array at every row selection (measured: 41 ms instead
    of ~2 ms per 256-cell minibatch of a 100,000-cell matrix)."""
    X = X.tocsr()
    if X.indices.dtype == X.indptr.dtype:
        return X
    dtype = np.int32 if X.nnz < np.iinfo(np.int32).max else np.int64
    return sp.csr_matrix((X.data, X.indices.astype(dtype, copy=False),
                          X.indptr.astype(dtype, copy=False)), shape=X.shape)


def _get_rna(adata: AnnData, layer: str | None):
    if layer is None:
        return adata.X
    if layer not in adata.layers:
        raise KeyError(f"layer {layer!r} not in adata.layers (available: {list(adata.layers)})")
    return adata.layers[layer]


def _get_protein(adata: AnnData, key: str, names_uns_key: str | None = None
                 ) -> tuple[np.ndarray, list[str]]:
    """Protein counts (cells x proteins) and their names, checked against obs_names.

    Names come, as in scvi-tools, from ``adata.uns[names_uns_key]`` when that key is given, else
    from the columns of a DataFrame, else they are ``"0"``, ``"1"``, ...
    """
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
        names = [str(i) for i in range(values.shape[1])] if values.ndim == 2 else []
    if values.ndim != 2 or values.shape[1] == 0:
        raise TotalVIDataError(f"adata.obsm[{key!r}] has no protein columns.")
    if names_uns_key is not None:
        if names_uns_key not in adata.uns:
            raise KeyError(f"protein_names_uns_key {names_uns_key!r} not in adata.uns "
                           f"(available: {list(adata.uns)})")
        names = [str(n) for n in np.asarray(adata.uns[names_uns_key]).ravel()]
        if len(names) != values.shape[1] or len(set(names)) != len(names):
            raise TotalVIDataError(
                f"adata.uns[{names_uns_key!r}] must hold one distinct name per column of "
                f"adata.obsm[{key!r}] ({values.shape[1]}); it has {len(names)} names, "
                f"{len(set(names))} distinct")
    return values, names


def _categories(col: pd.Series) -> list[str]:
    """Categories of an obs column that occur in it, as strings (categorical order if any)."""
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
    else:
        try:
            cats = np.unique(col)
        except TypeError:  # mixed types: order by their text
            cats = sorted(set(col.astype(str)))
    present = set(col.astype(str))
    return [str(c) for c in cats if str(c) in present]


def _obs_column(adata: AnnData, key: str, what: str) -> pd.Series:
    if key not in adata.obs:
        raise KeyError(f"{what} {key!r} not in adata.obs (columns: {list(adata.obs)})")
    col = adata.obs[key]
    if col.isna().any():
        cell = adata.obs_names[np.flatnonzero(col.isna().to_numpy())[0]]
        raise TotalVIDataError(f"adata.obs[{key!r}] has missing values, e.g. cell {cell!r}")
    return col


def _as_bool(values, what: str) -> np.ndarray:
    """A boolean array from bool or 0/1 values; anything else is an error naming ``what``."""
    values = np.asarray(values)
    if values.dtype == bool:
        return values
    if values.dtype.kind in "iuf" and np.isin(values, (0, 1)).all():
        return values.astype(bool)
    raise TotalVIDataError(f"{what} must be boolean (True = measured) or 0/1; got dtype "
                           f"{values.dtype}")


def _same_labels(given: list[str], expected: list[str], what: str) -> None:
    """Raise unless ``given`` holds exactly the labels ``expected`` (in any order)."""
    unknown = sorted(set(given) - set(expected))
    absent = [e for e in expected if e not in given]
    if unknown or absent:
        raise TotalVIDataError(f"{what}: unknown {unknown[:5]}, missing {absent[:5]}")


def _batch_protein_mask(mask, categories: list[str], protein_names: list[str]) -> np.ndarray:
    """A user's batches x proteins mask as a bool array in registry order (batches, proteins)."""
    K, T = len(categories), len(protein_names)
    if isinstance(mask, pd.DataFrame):
        cols = [str(c) for c in mask.columns]
        _same_labels(cols, protein_names, "protein_mask columns must be the proteins of "
                                          "adata.obsm[...]")
        rows = [str(r) for r in mask.index]
        if K == 1 and len(rows) == 1:
            rows = categories
        _same_labels(rows, categories, f"protein_mask rows must be the batch categories "
                                       f"{categories}")
        frame = mask.copy()
        frame.index, frame.columns = rows, cols
        values = frame.loc[categories, protein_names].to_numpy()
    else:
        values = np.asarray(mask)
        if values.shape != (K, T):
            raise TotalVIDataError(
                f"protein_mask has shape {values.shape}; expected (batches, proteins) = ({K}, {T})"
                f" with rows in the order of the batch categories {categories}, or a DataFrame, "
                "or the name of an adata.obsm key (cells x proteins)")
    return _as_bool(values, "protein_mask")


def _cell_protein_mask(adata: AnnData, key: str, protein_names: list[str]) -> np.ndarray:
    """The cells x proteins mask stored in ``adata.obsm[key]``, columns in registry order."""
    if key not in adata.obsm:
        raise KeyError(f"protein_mask {key!r} not in adata.obsm (available: {list(adata.obsm)})")
    m = adata.obsm[key]
    if isinstance(m, pd.DataFrame):
        if not m.index.equals(adata.obs_names):
            raise TotalVIDataError(f"adata.obsm[{key!r}] cell names differ from adata.obs_names")
        cols = [str(c) for c in m.columns]
        absent = [p for p in protein_names if p not in cols]
        if absent:
            raise TotalVIDataError(f"adata.obsm[{key!r}] lacks proteins {absent[:5]}")
        m = m.set_axis(cols, axis=1)[protein_names].to_numpy()
    else:
        m = m.toarray() if sp.issparse(m) else np.asarray(m)
        if m.shape != (adata.n_obs, len(protein_names)):
            raise TotalVIDataError(f"adata.obsm[{key!r}] has shape {m.shape}; expected cells x "
                                   f"proteins = ({adata.n_obs}, {len(protein_names)})")
    return _as_bool(m, f"adata.obsm[{key!r}]")


def _check_continuous(adata: AnnData, key: str) -> np.ndarray:
    col = adata.obs[key] if key in adata.obs else None
    if col is None:
        raise KeyError(f"continuous covariate {key!r} not in adata.obs (columns: {list(adata.obs)})")
    if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
        raise TotalVIDataError(f"continuous covariate adata.obs[{key!r}] has dtype {col.dtype}; "
                               "expected numbers (use categorical_covariate_keys for labels)")
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~np.isfinite(values)
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise TotalVIDataError(
            f"continuous covariate adata.obs[{key!r}] has {int(bad.sum())} NaN or infinite "
            f"values, e.g. cell {adata.obs_names[i]!r} ({values[i]})")
    return values.astype(np.float32)


def size_factors(adata: AnnData, key: str) -> np.ndarray:
    """The registered size factor of every cell, ``adata.obs[key]``: finite numbers > 0."""
    if key not in adata.obs:
        raise KeyError(f"size_factor_key {key!r} not in adata.obs (columns: {list(adata.obs)})")
    col = adata.obs[key]
    if not pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col):
        raise TotalVIDataError(f"size factors adata.obs[{key!r}] have dtype {col.dtype}; "
                               "expected positive numbers")
    values = col.to_numpy(dtype=np.float64, na_value=np.nan)
    bad = ~(np.isfinite(values) & (values > 0))
    if bad.any():
        i = np.flatnonzero(bad)[0]
        raise TotalVIDataError(
            f"size factors adata.obs[{key!r}] must be finite and > 0; {int(bad.sum())} are not, "
            f"e.g. cell {adata.obs_names[i]!r} ({values[i]})")
    return values


def covariate_matrix(adata: AnnData, registry: dict) -> np.ndarray | None:
    """Extra network covariates ``(cells, p)``: one-hot of each categorical key (in the order of
    the categories recorded at registration), then the continuous keys as they are.

    ``None`` when none are registered. A category unseen at registration raises
    :class:`TotalVIDataError` naming the column and the category.
    """
    blocks = []
    cat_keys = registry_keys(registry, "categorical_covariate_keys")
    known = registry.get("categorical_covariate_categories") or {}
    for key in cat_keys:
        col = _obs_column(adata, key, "categorical covariate")
        cats = [str(c) for c in known[key]]
        values = col.astype(str).to_numpy()
        lookup = {c: i for i, c in enumerate(cats)}
        unknown = sorted(set(values) - set(lookup))
        if unknown:
            raise TotalVIDataError(
                f"categorical covariate adata.obs[{key!r}] has categories unseen at training "
                f"time: {unknown[:10]}; known: {cats[:20]}")
        codes = np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))
        blocks.append(np.eye(len(cats), dtype=np.float32)[codes])
    for key in registry_keys(registry, "continuous_covariate_keys"):
        blocks.append(_check_continuous(adata, key)[:, None])
    if not blocks:
        return None
    return np.ascontiguousarray(np.concatenate(blocks, axis=1), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Extension inputs: further per-cell arrays that a model extension registers (e.g. cell-type labels)
def register_obs_codes(adata: AnnData, registry: dict, name: str, key: str,
                       missing: str | None = None, what: str | None = None) -> dict:
    """Register the categorical column ``adata.obs[key]`` as the per-cell extension input ``name``.

    :class:`CiteData` then holds its integer codes (``-1`` where the value is ``missing``) in
    ``extras[name]``, and every minibatch passes them to the model and guide as the keyword
    argument ``name``. The categories (those present besides ``missing``, in categorical order)
    are recorded in ``registry["extras"][name]``; returns that entry. Writes nothing to ``adata``.
    """
    what = what or f"{name} key"
    col = _obs_column(adata, key, what)
    missing = None if missing is None else str(missing)
    categories = [c for c in _categories(col) if c != missing]
    if not categories:
        raise TotalVIDataError(
            f"adata.obs[{key!r}] holds no category besides {missing!r}: nothing to register "
            f"as {name}")
    spec = {"obs_key": key, "categories": categories, "missing": missing}
    registry.setdefault("extras", {})[name] = spec
    return spec


def obs_codes(adata: AnnData, spec: dict, name: str) -> np.ndarray:
    """Integer codes ``(cells,)`` of a column registered by :func:`register_obs_codes`.

    ``-1`` marks the ``missing`` category, and every cell of an AnnData without the column (a
    query whose labels are unknown). A category unseen at registration raises, naming it.
    """
    key = str(spec["obs_key"])
    if key not in adata.obs:
        return np.full(adata.n_obs, -1, dtype=np.int64)
    values = _obs_column(adata, key, f"{name} key").astype(str).to_numpy()
    lookup = {str(c): i for i, c in enumerate(spec["categories"])}
    missing = spec.get("missing")
    if missing is not None:
        lookup[str(missing)] = -1
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise TotalVIDataError(
            f"adata.obs[{key!r}] ({name}) has categories unseen at training time: {unknown[:10]}"
            f"; known: {list(map(str, spec['categories']))[:20]}"
            + ("" if missing is None else f" and {missing!r} for unknown"))
    return np.fromiter((lookup[v] for v in values), dtype=np.int64, count=len(values))


def registry_keys(registry: dict, name: str) -> list[str]:
    """A list entry of the registry as strings (after ``read_h5ad`` an empty list is an empty
    float array and a list of strings an object array)."""
    value = registry.get(name)
    return [] if value is None else [str(k) for k in value]


def _key_list(keys, what: str) -> list[str]:
    if keys is None:
        return []
    if isinstance(keys, str):
        keys = [keys]
    keys = [str(k) for k in keys]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ValueError(f"{what} lists {dup} more than once")
    return keys


# ----------------------------------------------------------------------------------------------
class BackedCSR:
    """Rows of a CSR matrix stored in an open ``.h5ad`` (backed AnnData), read on demand.

    Only ``indptr`` (8 bytes per cell) is held in memory. A request for sorted rows reads each
    run of consecutive rows with one slice of ``data``/``indices``, so minibatches made of a few
    contiguous blocks (see ``train``'s block shuffling for backed data) cost a few reads.
    """

    def __init__(self, group):
        if group.attrs.get("encoding-type") != "csr_matrix":
            raise TotalVIDataError(
                "backed training needs RNA counts stored as a CSR matrix in the .h5ad "
                f"(found {group.attrs.get('encoding-type')!r})"
            )
        self.data, self.indices = group["data"], group["indices"]
        self.indptr = np.asarray(group["indptr"][:], dtype=np.int64)
        self.shape = tuple(int(v) for v in group.attrs["shape"])

    def __getitem__(self, idx) -> sp.csr_matrix:
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) and np.any(np.diff(idx) < 0):
            raise ValueError("BackedCSR rows must be requested in increasing order")
        breaks = np.flatnonzero(np.diff(idx) != 1) + 1
        data, indices = [], []
        for run in np.split(idx, breaks):
            if len(run):
                start, stop = self.indptr[run[0]], self.indptr[run[-1] + 1]
                data.append(self.data[start:stop])
                indices.append(self.indices[start:stop])
        lengths = self.indptr[idx + 1] - self.indptr[idx]
        indptr = np.concatenate([[0], np.cumsum(lengths)])
        if not data:  # no rows requested
            data, indices = [np.zeros(0, np.float32)], [np.zeros(0, np.int32)]
        return sp.csr_matrix((np.concatenate(data), np.concatenate(indices), indptr),
                             shape=(len(idx), self.shape[1]))

    def chunks(self, size: int = 100_000):
        """``(start, csr block)`` over all rows, in order."""
        for start in range(0, self.shape[0], size):
            yield start, self[np.arange(start, min(start + size, self.shape[0]))]

    def sum(self, axis: int):
        """Row (axis=1) or column (axis=0) sums, computed block by block."""
        if axis == 1:
            return np.concatenate([np.asarray(b.sum(axis=1)).ravel() for _, b in self.chunks()])
        total = np.zeros(self.shape[1])
        for _, block in self.chunks():
            total += np.asarray(block.sum(axis=0)).ravel()
        return total


def _backed_rna(adata: AnnData, layer: str | None) -> BackedCSR:
    if layer is not None:
        raise TotalVIDataError("backed AnnData: only adata.X can hold the RNA counts (layer=None)")
    return BackedCSR(adata.file["X"])


#: Fewest empty droplets per batch that :func:`register_anndata` accepts: the droplets pin a
#: per-protein ambient level of every batch, and a handful of droplets would pin it to noise.
MIN_DROPLETS_PER_BATCH = 10


def _isotype_names(isotype_controls, protein_names: list[str]) -> list[str]:
    """The declared isotype controls as a checked list of protein names (registry order)."""
    if isotype_controls is None:
        return []
    names = [isotype_controls] if isinstance(isotype_controls, str) else list(isotype_controls)
    names = [str(n) for n in names]
    if protein_names is None:  # a query without proteins: the reference's names, checked there
        return names
    unknown = [n for n in names if n not in protein_names]
    if unknown:
        raise TotalVIDataError(f"isotype_controls {unknown} are not proteins of the data "
                               f"(proteins: {protein_names[:10]}{'...' if len(protein_names) > 10 else ''})")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise TotalVIDataError(f"isotype_controls lists {dup} more than once")
    if len(names) == len(protein_names):
        raise TotalVIDataError(
            f"isotype_controls declares all {len(names)} proteins background-only; at least one "
            "protein must be able to be foreground")
    return [p for p in protein_names if p in names]


def _droplet_proteins(droplets: AnnData, key: str, protein_names: list[str]) -> np.ndarray:
    """The droplets' protein counts ``(D, T)``, columns in the cells' (registry) order."""
    if key not in droplets.obsm:
        raise KeyError(f"empty_droplets.obsm has no {key!r} (the cells' protein key); "
                       f"available: {list(droplets.obsm.keys())}")
    pro = droplets.obsm[key]
    if isinstance(pro, pd.DataFrame):
        cols = [str(c) for c in pro.columns]
        unknown = [c for c in cols if c not in protein_names]
        absent = [p for p in protein_names if p not in cols]
        if unknown or absent:
            raise TotalVIDataError(
                f"empty_droplets proteins differ from the cells': not in the cells {unknown[:5]}, "
                f"missing {absent[:5]}")
        values = pro.set_axis(cols, axis=1)[protein_names].to_numpy()
    else:
        values = pro.toarray() if sp.issparse(pro) else np.asarray(pro)
        if values.ndim != 2 or values.shape[1] != len(protein_names):
            raise TotalVIDataError(
                f"empty_droplets.obsm[{key!r}] has shape {values.shape}; expected (droplets, "
                f"{len(protein_names)}) proteins in the cells' order (or a DataFrame with names)")
    _check_counts(values, droplets.obs_names, protein_names,
                  f"empty droplet protein counts (empty_droplets.obsm[{key!r}])", "error")
    return values


def _droplet_entry(droplets, key: str, protein_names: list[str], batch_key: str | None,
                   categories: list[str]) -> dict:
    """Validate the empty droplets and return their registry entry (counts and batches)."""
    if not isinstance(droplets, AnnData):
        raise TotalVIDataError(f"empty_droplets must be an AnnData (droplets x genes, protein "
                               f"counts in obsm[{key!r}]); got {type(droplets).__name__}")
    if droplets.n_obs == 0:
        raise TotalVIDataError("empty_droplets has no droplets (n_obs == 0)")
    counts = _droplet_proteins(droplets, key, protein_names)
    if batch_key is None:
        labels = np.full(droplets.n_obs, categories[0])
    else:
        if batch_key not in droplets.obs:
            raise TotalVIDataError(
                f"the cells have batches (batch_key={batch_key!r}) but empty_droplets.obs has no "
                f"{batch_key!r} column: say which batch (channel) each droplet comes from")
        labels = _obs_column(droplets, batch_key, "batch_key of empty_droplets").astype(str)
        labels = labels.to_numpy()
        unknown = sorted(set(labels) - set(categories))
        if unknown:
            raise TotalVIDataError(f"empty_droplets.obs[{batch_key!r}] has batches the cells do "
                                   f"not have: {unknown[:5]}; cells' batches: {categories}")
    few = {c: int((labels == c).sum()) for c in categories
           if (labels == c).sum() < MIN_DROPLETS_PER_BATCH}
    if few:
        raise TotalVIDataError(
            f"empty_droplets needs at least {MIN_DROPLETS_PER_BATCH} droplets per batch; "
            f"droplets per batch: {few}")
    return {"protein_counts": counts.astype(np.int32 if counts.max(initial=0) < 2**31 else
                                            np.int64),
            "batch": [str(v) for v in labels], "n_droplets": int(droplets.n_obs)}


#: Why ``empty_droplets`` and ``panel_key`` cannot be combined (yet).
_DROPLETS_AND_PANELS = (
    "empty_droplets cannot be combined with panel_key: the droplets' ambient level is modelled "
    "per batch (their batch_key column) while a panel_key makes the cells' background prior "
    "per panel, and the droplets carry no panel. Register the droplets without panel_key (when "
    "each batch has one panel, the batches are the panels), or drop empty_droplets.")


def _panels_and_size_factors(adata: AnnData, panel_key: str | None,
                             size_factor_key: str | None) -> list[str] | None:
    """Check the panel and size-factor columns; the panel categories (``None``: no panels)."""
    if size_factor_key is not None:
        size_factors(adata, size_factor_key)
    return None if panel_key is None else _categories(_obs_column(adata, panel_key, "panel_key"))


def _check_rna(adata: AnnData, layer: str | None, non_integer: str):
    """The RNA counts (backed or in memory), checked (block by block when backed)."""
    X = _backed_rna(adata, layer) if adata.isbacked else _get_rna(adata, layer)
    what = "adata.X" if layer is None else f"adata.layers[{layer!r}]"
    if adata.isbacked:  # check block by block: the matrix never comes into memory whole
        for start, block in X.chunks():
            _check_counts(block, adata.obs_names[start:], adata.var_names, f"RNA counts ({what})",
                          non_integer)
    else:
        _check_counts(X, adata.obs_names, adata.var_names, f"RNA counts ({what})", non_integer)
    return X


def register_anndata(
    adata: AnnData,
    protein_expression_obsm_key: str = "protein_expression",
    batch_key: str | None = None,
    layer: str | None = None,
    non_integer: str = "warn",
    protein_mask=None,
    categorical_covariate_keys=None,
    continuous_covariate_keys=None,
    proteins_optional: bool = False,
    isotype_controls=None,
    empty_droplets=None,
    protein_names_uns_key: str | None = None,
    panel_key: str | None = None,
    size_factor_key: str | None = None,
) -> dict:
    """Validate ``adata`` and write the registry ``adata.uns["_pyro_totalvi"]``.

    Only that one ``uns`` entry is written; counts and ``obs`` are left untouched. See
    :meth:`pyro_totalvi.TOTALVI.setup_anndata` for the arguments. ``proteins_optional``: an
    ``adata`` without the protein table is accepted (an RNA-only query of a reference model,
    :mod:`pyro_totalvi.query`); its registry then has ``protein_names = None``.
    """
    if adata.n_obs == 0:
        raise TotalVIDataError("adata has no cells (n_obs == 0).")
    if adata.n_vars == 0:
        raise TotalVIDataError("adata has no genes (n_vars == 0).")
    X = _check_rna(adata, layer, non_integer)
    protein_names = None
    if not proteins_optional or protein_expression_obsm_key in adata.obsm:
        y, protein_names = _get_protein(adata, protein_expression_obsm_key, protein_names_uns_key)
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
        categories = _categories(_obs_column(adata, batch_key, "batch_key"))
    panels = _panels_and_size_factors(adata, panel_key, size_factor_key)
    cat_keys = _key_list(categorical_covariate_keys, "categorical_covariate_keys")
    cont_keys = _key_list(continuous_covariate_keys, "continuous_covariate_keys")
    clash = sorted((set(cat_keys) & set(cont_keys)) | ({batch_key} & set(cat_keys + cont_keys)))
    if clash:
        raise ValueError(f"{clash} given as more than one of batch_key, categorical and "
                         "continuous covariates")
    cov_categories = {k: _categories(_obs_column(adata, k, "categorical covariate"))
                      for k in cat_keys}
    registry = {
        "protein_expression_obsm_key": protein_expression_obsm_key,
        "batch_key": batch_key,
        "layer": layer,
        "batch_categories": categories,
        "protein_names": protein_names,
        "protein_mask": None,
        "protein_mask_obsm_key": None,
        "categorical_covariate_keys": cat_keys,
        "categorical_covariate_categories": cov_categories,
        "continuous_covariate_keys": cont_keys,
        "isotype_controls": _isotype_names(isotype_controls, protein_names),
        "empty_droplets": None,
        "protein_names_uns_key": protein_names_uns_key,
        "panel_key": panel_key,
        "panel_categories": panels,
        "size_factor_key": size_factor_key,
    }
    covariate_matrix(adata, registry)  # NaN / dtype checks of the continuous covariates
    _register_mask_and_droplets(adata, registry, protein_mask, empty_droplets)
    adata.uns[REGISTRY_KEY] = registry
    return registry


def _register_mask_and_droplets(adata: AnnData, registry: dict, protein_mask,
                                empty_droplets) -> None:
    """Validate ``protein_mask`` and ``empty_droplets`` and add them to ``registry``."""
    names, panels = registry["protein_names"], registry["panel_categories"]
    if empty_droplets is not None:
        if panels is not None:
            raise TotalVIDataError(_DROPLETS_AND_PANELS)
        registry["empty_droplets"] = _droplet_entry(
            empty_droplets, registry["protein_expression_obsm_key"], names,
            registry["batch_key"], registry["batch_categories"])
    if isinstance(protein_mask, str):
        if names is not None:
            _cell_protein_mask(adata, protein_mask, names)  # validate now
        registry["protein_mask_obsm_key"] = protein_mask
    elif protein_mask is not None and names is not None:
        # rows: the panels when there are panels, else the batches
        registry["protein_mask"] = _batch_protein_mask(
            protein_mask, registry["batch_categories"] if panels is None else panels,
            names).tolist()


def register_like(adata: AnnData, registry: dict) -> dict:
    """Register ``adata`` with the settings of another registry (e.g. a saved model's).

    A batches x proteins ``protein_mask`` is not re-validated here (``adata`` may hold a subset of
    the batches): install the other registry afterwards, as :meth:`TOTALVI.load` does. A mapped
    query model's registry (``proteins_optional``) accepts an ``adata`` without proteins.
    """
    new = register_anndata(
        adata, registry["protein_expression_obsm_key"], registry["batch_key"], registry["layer"],
        protein_mask=registry.get("protein_mask_obsm_key"),
        categorical_covariate_keys=registry_keys(registry, "categorical_covariate_keys"),
        continuous_covariate_keys=registry_keys(registry, "continuous_covariate_keys"),
        proteins_optional=bool(registry.get("proteins_optional")),
        isotype_controls=registry_keys(registry, "isotype_controls") or None,
        protein_names_uns_key=registry.get("protein_names_uns_key"),
        panel_key=registry.get("panel_key"),
        size_factor_key=registry.get("size_factor_key"),
    )
    new["empty_droplets"] = registry.get("empty_droplets")  # validated when first registered
    return new


# ----------------------------------------------------------------------------------------------
# MuData: the RNA modality as an AnnData, the protein modality's counts in its obsm
MUDATA_PROTEIN_KEY = "protein_expression"
_MUDATA_MODALITY_ARGS = ("rna_layer", "protein_layer", "batch_key", "categorical_covariate_keys",
                         "continuous_covariate_keys", "protein_mask", "size_factor_key",
                         "panel_key")


def is_mudata(obj) -> bool:
    """Whether ``obj`` is a ``mudata.MuData`` (without importing mudata)."""
    return hasattr(obj, "mod") and hasattr(obj, "obs") and not isinstance(obj, AnnData)


def _modality(mdata, name: str | None, what: str):
    if name is None:
        return None
    if name not in mdata.mod:
        raise KeyError(f"modality {name!r} (for {what}) not in mdata.mod "
                       f"(available: {list(mdata.mod)})")
    return mdata.mod[name]


def _aligned(frame_index: pd.Index, cells: pd.Index, where: str) -> np.ndarray:
    """Positions of ``cells`` in ``frame_index``; every cell must be there exactly once."""
    if frame_index.equals(cells):
        return np.arange(len(cells))
    if not frame_index.is_unique:
        raise TotalVIDataError(f"{where} has duplicated cell names")
    pos = frame_index.get_indexer(cells)
    if (pos < 0).any():
        raise TotalVIDataError(
            f"{where} lacks {int((pos < 0).sum())} cells of the RNA modality, e.g. "
            f"{cells[np.flatnonzero(pos < 0)[0]]!r}; keep the cells measured in both modalities "
            "first, e.g. mudata.pp.intersect_obs(mdata)")
    return pos


def anndata_from_mudata(mdata, registry: dict) -> AnnData:
    """The AnnData that totalVI trains on, built from a MuData.

    ``X``: the RNA modality's counts (``rna_layer``); ``obsm["protein_expression"]``: the protein
    modality's counts (``protein_layer``) as a cells x proteins DataFrame, rows in the RNA
    modality's cell order; ``obs``: the RNA modality's ``obs`` plus the batch and covariate
    columns taken from the modality ``modalities`` names for them (``None``: ``mdata.obs``).
    Counts are referenced, not copied, where possible; ``mdata`` is not modified.
    """
    settings = registry["mudata"]
    mods = dict(settings["modalities"])
    rna = _modality(mdata, mods.get("rna_layer"), "rna_layer")
    prot = _modality(mdata, mods.get("protein_layer"), "protein_layer")
    if rna is None or prot is None:
        raise ValueError("modalities must name the RNA ('rna_layer') and protein "
                         "('protein_layer') modalities")
    cells = rna.obs_names
    if not mdata.obs_names.equals(cells):
        raise TotalVIDataError(
            f"mdata has {mdata.n_obs} cells but its RNA modality {mods['rna_layer']!r} has "
            f"{rna.n_obs} (or another order); keep the cells measured in both modalities first, "
            "e.g. mudata.pp.intersect_obs(mdata)")
    X = _get_rna(rna, settings.get("rna_layer"))
    layer = settings.get("protein_layer")
    Y = prot.X if layer is None else _get_rna(prot, layer)
    Y = Y.toarray() if sp.issparse(Y) else np.asarray(Y)
    pos = _aligned(prot.obs_names, cells, f"protein modality {mods['protein_layer']!r}")
    proteins = pd.DataFrame(Y[pos], index=cells, columns=[str(v) for v in prot.var_names])
    obs = rna.obs.copy()
    keys = [("batch_key", registry.get("batch_key")), ("panel_key", registry.get("panel_key")),
            ("size_factor_key", registry.get("size_factor_key"))]
    keys += [("categorical_covariate_keys", k)
             for k in registry_keys(registry, "categorical_covariate_keys")]
    keys += [("continuous_covariate_keys", k)
             for k in registry_keys(registry, "continuous_covariate_keys")]
    for arg, key in keys:
        if key is None:
            continue
        source = _modality(mdata, mods.get(arg), arg)
        frame = mdata.obs if source is None else source.obs
        where = "mdata.obs" if source is None else f"mdata.mod[{mods[arg]!r}].obs"
        if key not in frame:
            raise KeyError(f"{arg} {key!r} not in {where} (columns: {list(frame)})")
        obs[key] = frame[key].iloc[_aligned(frame.index, cells, where)].to_numpy()
        if isinstance(frame[key].dtype, pd.CategoricalDtype):
            obs[key] = pd.Categorical(obs[key], categories=frame[key].cat.categories)
    adata = AnnData(X=X, obs=obs, var=pd.DataFrame(index=rna.var_names))
    adata.obsm[MUDATA_PROTEIN_KEY] = proteins
    mask_key = registry.get("protein_mask_obsm_key")
    if mask_key is not None:
        source = _modality(mdata, mods.get("protein_mask"), "protein_mask") or prot
        if mask_key not in source.obsm:
            raise KeyError(f"protein_mask {mask_key!r} not in the obsm of the protein modality")
        m = source.obsm[mask_key]
        p = _aligned(source.obs_names, cells, "protein_mask")
        adata.obsm[mask_key] = (m.iloc[p].set_axis(cells) if isinstance(m, pd.DataFrame)
                                else np.asarray(m)[p])
    return adata


def _protein_modality_droplets(droplets) -> AnnData:
    """Empty droplets given like a MuData's protein modality (counts in ``X``, proteins as
    ``var_names``) in the form :func:`register_anndata` takes (``obsm["protein_expression"]``)."""
    if not isinstance(droplets, AnnData) or MUDATA_PROTEIN_KEY in droplets.obsm:
        return droplets
    Y = droplets.X.toarray() if sp.issparse(droplets.X) else np.asarray(droplets.X)
    out = AnnData(obs=droplets.obs.copy())
    out.obsm[MUDATA_PROTEIN_KEY] = pd.DataFrame(Y, index=droplets.obs_names,
                                                columns=[str(v) for v in droplets.var_names])
    return out


def register_mudata(
    mdata,
    rna_layer: str | None = None,
    protein_layer: str | None = None,
    batch_key: str | None = None,
    categorical_covariate_keys=None,
    continuous_covariate_keys=None,
    protein_mask=None,
    modalities: dict | None = None,
    non_integer: str = "warn",
    isotype_controls=None,
    empty_droplets=None,
    panel_key: str | None = None,
    size_factor_key: str | None = None,
) -> dict:
    """Validate a MuData and write the registry to ``mdata.uns["_pyro_totalvi"]``.

    See :meth:`pyro_totalvi.TOTALVI.setup_mudata` for the arguments.
    """
    if modalities is None:
        raise ValueError("modalities is required, e.g. {'rna_layer': 'rna', 'protein_layer': "
                         "'prot', 'batch_key': 'rna'}")
    extra = sorted(set(modalities) - set(_MUDATA_MODALITY_ARGS))
    if extra:
        raise ValueError(f"modalities has keys that are not arguments: {extra}; allowed: "
                         f"{list(_MUDATA_MODALITY_ARGS)}")
    mods = {k: modalities.get(k) for k in _MUDATA_MODALITY_ARGS}
    if mods["protein_mask"] is None:
        mods["protein_mask"] = mods["protein_layer"]
    if mods["panel_key"] is None:  # scvi-tools reads the panel from batch_key's modality
        mods["panel_key"] = mods["batch_key"]
    provisional = {
        "batch_key": batch_key,
        "panel_key": panel_key,
        "size_factor_key": size_factor_key,
        "categorical_covariate_keys": _key_list(categorical_covariate_keys,
                                                "categorical_covariate_keys"),
        "continuous_covariate_keys": _key_list(continuous_covariate_keys,
                                               "continuous_covariate_keys"),
        "protein_mask_obsm_key": protein_mask if isinstance(protein_mask, str) else None,
        "mudata": {"rna_layer": rna_layer, "protein_layer": protein_layer, "modalities": mods},
    }
    adata = anndata_from_mudata(mdata, provisional)
    registry = register_anndata(
        adata, MUDATA_PROTEIN_KEY, batch_key, None, non_integer, protein_mask=protein_mask,
        categorical_covariate_keys=provisional["categorical_covariate_keys"],
        continuous_covariate_keys=provisional["continuous_covariate_keys"],
        isotype_controls=isotype_controls,
        empty_droplets=None if empty_droplets is None else _protein_modality_droplets(
            empty_droplets),
        panel_key=panel_key, size_factor_key=size_factor_key)
    registry["mudata"] = provisional["mudata"]
    mdata.uns[REGISTRY_KEY] = registry
    return registry


def batch_codes(adata: AnnData, registry: dict, what: str = "batch") -> np.ndarray:
    """Integer batch (or, with ``what="panel"``, panel) code per cell; raises on categories
    unseen at registration."""
    key, categories = registry[f"{what}_key"], registry[f"{what}_categories"]
    if key is None:
        return np.zeros(adata.n_obs, dtype=np.int64)
    if key not in adata.obs:
        raise KeyError(f"{what}_key {key!r} not in adata.obs (columns: {list(adata.obs)})")
    values = adata.obs[key].astype(str).to_numpy()
    lookup = {str(c): i for i, c in enumerate(categories)}
    unknown = sorted(set(values) - set(lookup))
    if unknown:
        raise TotalVIDataError(
            f"adata.obs[{key!r}] has categories unseen at training time: {unknown}; "
            f"known: {list(categories)}"
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
    covariates: torch.Tensor | None = None
    #: Further per-cell tensors that a model extension registers (e.g. ``labels``), passed to
    #: its ``model`` and ``guide`` as keyword arguments: ``model(*mb.args(), **mb.kwargs())``.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def args(self):
        return (self.x, self.y, self.s, self.log_library, self.covariates, self.protein_mask)

    def kwargs(self) -> dict[str, torch.Tensor]:
        return dict(self.extras)

    def to(self, device: torch.device | str | None) -> Minibatch:
        """The same minibatch on ``device`` (itself when it is there already)."""
        if device is None or self.x.device == torch.device(device):
            return self

        def move(t):
            if t is None:
                return None
            moved = t.to(device, non_blocking=True)
            if hasattr(t, "_flat_nonzero"):  # see distributions.with_nonzero
                with_nonzero(moved, t._flat_nonzero.to(device, non_blocking=True))
            return moved

        return Minibatch(**{f.name: move(getattr(self, f.name)) for f in fields(self)
                            if f.name != "extras"},
                         extras={k: move(v) for k, v in self.extras.items()})


@dataclass
class DropletBatch:
    """Tensors of a minibatch of empty droplets (the ``droplets`` argument of the model)."""

    y: torch.Tensor
    s: torch.Tensor
    idx: torch.Tensor
    n_obs: int
    protein_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str | None) -> DropletBatch:
        if device is None or self.y.device == torch.device(device):
            return self
        mask = None if self.protein_mask is None else self.protein_mask.to(device)
        return DropletBatch(self.y.to(device), self.s.to(device), self.idx.to(device),
                            self.n_obs, mask)


class DropletData:
    """The registered empty droplets: protein counts ``(D, T)`` and batch codes ``(D,)``."""

    def __init__(self, entry: dict, registry: dict, protein_measured: np.ndarray):
        self.Y = np.ascontiguousarray(np.asarray(entry["protein_counts"], dtype=np.float32))
        lookup = {c: i for i, c in enumerate(registry["batch_categories"])}
        self.batch = np.array([lookup[str(b)] for b in entry["batch"]], dtype=np.int64)
        self.protein_measured = protein_measured
        self._eye = torch.eye(len(lookup))

    @property
    def n_obs(self) -> int:
        return self.Y.shape[0]

    def minibatch(self, idx: np.ndarray, device: torch.device | str | None = None
                  ) -> DropletBatch:
        """The droplets ``idx`` (sorted) as tensors; unmeasured proteins of their batch masked."""
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        mask = None
        if not self.protein_measured.all():
            mask = torch.from_numpy(np.ascontiguousarray(self.protein_measured[self.batch[idx]]))
        return DropletBatch(torch.from_numpy(self.Y[idx]),
                            self._eye[torch.from_numpy(self.batch[idx])],
                            torch.from_numpy(idx), self.n_obs, mask).to(device)


class CiteData:
    """Registered CITE-seq data as arrays ready for slicing into minibatches.

    Parameters
    ----------
    adata
        AnnData registered with :func:`register_anndata` (or any AnnData with the same genes,
        proteins, batch and covariate categories as ``registry``).
    registry
        The registry to check ``adata`` against; default ``adata.uns["_pyro_totalvi"]``.

    override_missing_proteins
        ``True``: a protein with zero counts in every cell of a batch (or panel) is still taken
        as measured, as scvi-tools' ``TOTALVI(..., override_missing_proteins=True)``; an
        explicit ``protein_mask`` is applied either way.

    Attributes
    ----------
    panel, n_panels, panel_categories
        The protein panel of every cell: the registered ``panel_key`` codes, or the batch codes
        when no ``panel_key`` was registered (then a panel is a batch).
    protein_measured
        Bool ``(panels, proteins)``: whether a protein was measured in a panel; from the
        registered ``protein_mask`` if any, else a protein with zero counts in every cell of a
        panel counts as not measured there (as scvi-tools decides).
    cell_protein_mask
        Bool ``(cells, proteins)`` when the mask was registered per cell (an ``obsm`` key), else
        ``None``.
    covariates
        Float ``(cells, p)`` network covariates (:func:`covariate_matrix`) or ``None``.
    log_library
        ``log l`` of every cell: the log total RNA counts, or the log of the registered size
        factor (``size_factor_key``).
    droplets
        The registered empty droplets (:class:`DropletData`), or ``None``.
    extras
        Per-cell arrays of the registered extension inputs named in ``extras`` (see
        :func:`register_obs_codes`); each minibatch carries their rows in ``Minibatch.extras``.
    """

    def __init__(self, adata: AnnData, registry: dict | None = None,
                 extras: tuple[str, ...] = (), override_missing_proteins: bool = False):
        if registry is None:
            if REGISTRY_KEY not in adata.uns:
                raise TotalVIDataError(
                    "adata is not registered: call TOTALVI.setup_anndata(adata, ...) first."
                )
            registry = dict(adata.uns[REGISTRY_KEY])
        self.registry = registry
        self.backed = adata.isbacked
        if self.backed:
            self.X = _backed_rna(adata, registry["layer"])
        else:
            X = _get_rna(adata, registry["layer"])
            self.X = _uniform_index_csr(X) if sp.issparse(X) else np.asarray(X)
        key = registry["protein_expression_obsm_key"]
        protein_names = [str(p) for p in registry["protein_names"]]
        #: False for an RNA-only query of a mapped model (no protein table; registry
        #: ``proteins_optional``): every protein then counts as unmeasured in every cell.
        self.has_proteins = key in adata.obsm or not registry.get("proteins_optional")
        if self.has_proteins:
            y, names = _get_protein(adata, key, registry.get("protein_names_uns_key"))
            if list(names) != protein_names:
                raise TotalVIDataError(
                    f"proteins differ from the training data: expected {len(protein_names)}"
                    f" proteins {protein_names[:5]}..., got {len(names)} "
                    f"{list(names)[:5]}..."
                )
        else:
            y = np.zeros((adata.n_obs, len(protein_names)), dtype=np.float32)
        self.Y = np.ascontiguousarray(y, dtype=np.float32)
        self.batch = batch_codes(adata, registry)
        self.n_batches = len(registry["batch_categories"])
        self.has_panels = registry.get("panel_key") is not None
        self.panel = batch_codes(adata, registry, "panel") if self.has_panels else self.batch
        self.panel_categories = [str(c) for c in registry[
            "panel_categories" if self.has_panels else "batch_categories"]]
        self.n_panels = len(self.panel_categories)
        if registry.get("size_factor_key") is not None:
            self.log_library = np.log(size_factors(adata, registry["size_factor_key"]))
        else:
            totals = np.asarray(self.X.sum(axis=1)).ravel().astype(np.float64)
            self.log_library = np.log(np.maximum(totals, 1.0))
        self.log_library = self.log_library.astype(np.float32)
        self._find_measured(adata, protein_names, override_missing_proteins)
        self.covariates = covariate_matrix(adata, registry)
        self._find_extras(adata, extras)
        self._eye = torch.eye(self.n_batches)
        self._panel_eye = torch.eye(self.n_panels)
        entry = registry.get("empty_droplets")
        if entry and self.has_panels:  # setup refuses this; a hand-edited registry lands here
            raise TotalVIDataError(_DROPLETS_AND_PANELS)
        # without panels, a panel is a batch: protein_measured is per batch, as the droplets need
        self.droplets = None if not entry else DropletData(entry, registry, self.protein_measured)

    def _find_measured(self, adata: AnnData, protein_names: list[str], override: bool) -> None:
        """``protein_measured`` (panels x proteins) and ``cell_protein_mask`` (or ``None``)."""
        self.cell_protein_mask = None
        mask_key = self.registry.get("protein_mask_obsm_key")
        panel_mask = self.registry.get("protein_mask")
        measured = np.ones((self.n_panels, self.Y.shape[1]), dtype=bool)
        if not self.has_proteins:  # no protein table: nothing measured in these cells' panels
            measured[np.unique(self.panel)] = False
        elif mask_key is not None:  # the user's cells x proteins mask
            cell_mask = _cell_protein_mask(adata, str(mask_key), protein_names)
            for b in np.unique(self.panel):
                measured[b] = cell_mask[self.panel == b].any(axis=0)
            # a mask that is constant within each panel is kept per panel (cheaper, same model)
            if not np.array_equal(cell_mask, measured[self.panel]):
                self.cell_protein_mask = cell_mask
        elif panel_mask is not None:  # the user's panels (batches) x proteins mask
            measured = np.array(panel_mask, dtype=bool).reshape(self.n_panels, -1)
        elif not override:
            # A protein with zero counts in every cell of a panel was not measured there
            # (as scvi-tools decides); it is masked out of that panel's likelihood.
            for b in np.unique(self.panel):
                measured[b] = self.Y[self.panel == b].sum(axis=0) > 0
        self.protein_measured = measured

    def _find_extras(self, adata: AnnData, extras: tuple[str, ...]) -> None:
        """``extras``: the per-cell codes of the registered extension inputs the model needs."""
        registered = self.registry.get("extras") or {}
        absent = [name for name in extras if name not in registered]
        if absent:
            raise TotalVIDataError(
                f"the model needs the inputs {absent}, which adata's registry lacks (registered:"
                f" {sorted(registered)}); set it up with the model class's setup_anndata")
        self.extras = {name: obs_codes(adata, registered[name], name) for name in extras}

    @property
    def n_obs(self) -> int:
        return self.Y.shape[0]

    @property
    def n_genes(self) -> int:
        return self.X.shape[1]

    @property
    def n_proteins(self) -> int:
        return self.Y.shape[1]

    @property
    def n_covariates(self) -> int:
        return 0 if self.covariates is None else self.covariates.shape[1]

    def measured(self, idx: np.ndarray) -> np.ndarray:
        """Bool ``(len(idx), proteins)``: which proteins were measured in these cells."""
        if self.cell_protein_mask is not None:
            return self.cell_protein_mask[idx]
        return self.protein_measured[self.panel[idx]]

    def minibatch(self, idx: np.ndarray, device: torch.device | str | None = None) -> Minibatch:
        """Dense tensors for the cells ``idx`` (sorted for cache-friendly CSR row access).

        Rows are cut and densified on the CPU, one minibatch at a time, then moved to
        ``device``: the data set itself never leaves host memory (or the disk, when backed).
        """
        idx = np.sort(np.asarray(idx, dtype=np.int64))
        rows = self.X[idx]
        x = torch.from_numpy(np.asarray(rows.toarray() if sp.issparse(rows) else rows,
                                        dtype=np.float32))
        if sp.issparse(rows):  # the likelihood's nonzero entries, known from the CSR indices
            with_nonzero(x, torch.from_numpy(_flat_nonzero_csr(rows)))
        batch = self.batch[idx]
        mask = None
        if self.cell_protein_mask is not None or not self.protein_measured.all():
            mask = torch.from_numpy(np.ascontiguousarray(self.measured(idx)))
        # the panel (one-hot) indexes the background prior; only when one is registered, so
        # that model extensions without a `panel` argument keep working
        extras = {name: torch.from_numpy(values[idx]) for name, values in self.extras.items()}
        if self.has_panels:
            extras["panel"] = self._panel_eye[torch.from_numpy(self.panel[idx])]
        return Minibatch(
            x=x,
            y=torch.from_numpy(self.Y[idx]),
            s=self._eye[torch.from_numpy(batch)],
            log_library=torch.from_numpy(self.log_library[idx]).unsqueeze(-1),
            protein_mask=mask,
            idx=torch.from_numpy(idx),
            covariates=None if self.covariates is None else torch.from_numpy(self.covariates[idx]),
            extras=extras,
        ).to(device)


def _flat_nonzero_csr(rows: sp.csr_matrix) -> np.ndarray:
    """Flat (row-major) positions of the nonzero entries of ``rows`` (stored zeros left out)."""
    row = np.repeat(np.arange(rows.shape[0], dtype=np.int64), np.diff(rows.indptr))
    flat = row * rows.shape[1] + rows.indices
    return flat[rows.data != 0] if (rows.data == 0).any() else flat


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
    """Initial c_t, exp(d_t) of Eq. (11), shape ``(T, K)``, from the data.

    ``K`` is the number of panels (``data.panel``: the batches unless a ``panel_key`` was
    registered). For (up to ``n_cells``) cells of each panel, a two-component Gaussian mixture
    over the cell's ``log(y + 1)`` across its measured proteins separates the background level of
    that cell from its foreground; the mean and standard deviation of the lower component,
    aggregated over cells, initialise every protein of the panel. A per-protein fit would call the
    upper half of a purely background antibody (an isotype control) "foreground".

    The procedure is scvi-tools' (``TOTALVI._get_totalvi_protein_priors``) with one deliberate
    difference in the aggregated scale: here the root mean square of the cells' standard
    deviations (how widely one cell's background spreads), where scvi-tools 1.4 divides it by
    the square root of the number of cells (the standard deviation of the *mean*, a ten times
    narrower prior for 100 cells). On ``bmmc_cite_starter.h5ad`` (200 epochs, seeds 0-2,
    ``benchmarks/bmmc_quality.py``) scvi-tools' scale gave a 5-NN cell-type accuracy of 0.675
    against 0.692 with this one. scvi-tools also samples 100 cells with replacement.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    rng = np.random.default_rng(seed)
    T, K = data.n_proteins, data.n_panels
    mean, scale = np.zeros((T, K), np.float32), np.ones((T, K), np.float32)
    for b in range(K):
        cells = np.flatnonzero(data.panel == b)
        # too few proteins to tell the two apart
        if len(cells) == 0 or data.protein_measured[b].sum() < 5:
            mean[:, b], scale[:, b] = 0.0, 1.0
            continue
        if len(cells) > n_cells:
            cells = rng.choice(cells, n_cells, replace=False)
        mus, sds = [], []
        for c in cells:
            v = np.log1p(data.Y[c, data.measured(np.array([c]))[0]]).reshape(-1, 1)
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
