"""Bad input gets a clear error naming the culprit, and the user's AnnData is left alone."""

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pyro_totalvi import TOTALVI, TotalVIDataError, simulate
from pyro_totalvi.data import CiteData


@pytest.fixture
def raw(sim_adata):
    return sim_adata[:60].copy()


def _setup(a, **kw):
    TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression",
                          batch_key=kw.pop("batch_key", "batch"), **kw)


@pytest.mark.parametrize("value,kind", [(-1.0, "negative"), (np.nan, "NaN"), (np.inf, "infinite")])
@pytest.mark.parametrize("where", ["rna", "protein"])
def test_bad_counts_name_cell_and_feature(raw, value, kind, where):
    if where == "rna":
        X = raw.X.toarray()
        X[3, 7] = value
        raw.X = sp.csr_matrix(X)
        feature = raw.var_names[7]
    else:
        raw.obsm["protein_expression"].iloc[3, 2] = value
        feature = raw.obsm["protein_expression"].columns[2]
    with pytest.raises(TotalVIDataError, match=kind) as err:
        _setup(raw)
    assert raw.obs_names[3] in str(err.value) and feature in str(err.value)


@pytest.mark.parametrize("fmt", ["csc", "csr_int64_indptr"])
def test_bad_counts_found_in_any_sparse_layout(raw, fmt):
    X = raw.X.toarray()
    X[5, 11] = -2
    m = sp.csr_matrix(X)
    if fmt == "csr_int64_indptr":  # as some writers store it: scipy's tocoo() rejects this mix
        m.indptr = m.indptr.astype(np.int64)
        m.indices = m.indices.astype(np.int32)
    else:
        m = m.asformat(fmt)
    raw.X = m
    with pytest.raises(TotalVIDataError, match="negative") as err:
        _setup(raw)
    assert raw.obs_names[5] in str(err.value) and raw.var_names[11] in str(err.value)


def test_mixed_index_dtypes_are_unified_without_touching_adata(raw):
    m = sp.csr_matrix(raw.X)
    m.indptr = m.indptr.astype(np.int64)  # int32 indices with int64 indptr, as some writers do
    raw.X = m
    _setup(raw)
    data = CiteData(raw)
    assert data.X.indices.dtype == data.X.indptr.dtype
    assert raw.X.indptr.dtype == np.int64  # the user's matrix is left as it was
    idx = np.array([2, 9, 40])
    np.testing.assert_array_equal(data.minibatch(idx).x.numpy(), raw.X[idx].toarray())


def test_non_integer_counts_warn_or_error(raw):
    raw.X = raw.X.astype(np.float32) * 0.5
    with pytest.warns(UserWarning, match="non-integer"):
        _setup(raw)
    with pytest.raises(TotalVIDataError, match="non-integer"):
        _setup(raw, non_integer="error")


def test_protein_cell_names_must_match(raw):
    # anndata 0.12 refuses to store a misaligned DataFrame in obsm, so present one the way a
    # container without that check (an older anndata, a MuData view) would.
    from types import SimpleNamespace

    from pyro_totalvi.data import _get_protein

    table = raw.obsm["protein_expression"].copy()
    table.index = list(table.index[:-1]) + ["not_a_cell"]
    fake = SimpleNamespace(obsm={"protein_expression": table}, obs_names=raw.obs_names)
    with pytest.raises(TotalVIDataError, match="not_a_cell"):
        _get_protein(fake, "protein_expression")
    fake.obsm["protein_expression"] = table.iloc[::-1]
    with pytest.raises(TotalVIDataError, match="differ from adata.obs_names"):
        _get_protein(fake, "protein_expression")


def test_missing_keys(raw):
    with pytest.raises(KeyError, match="protein_counts"):
        TOTALVI.setup_anndata(raw, protein_expression_obsm_key="protein_counts")
    with pytest.raises(KeyError, match="donor"):
        TOTALVI.setup_anndata(raw, batch_key="donor")
    with pytest.raises(KeyError, match="counts"):
        TOTALVI.setup_anndata(raw, layer="counts")


def test_empty_inputs(raw):
    with pytest.raises(TotalVIDataError, match="no cells"):
        _setup(raw[:0].copy())
    with pytest.raises(TotalVIDataError, match="no genes"):
        _setup(raw[:, :0].copy())
    raw.obsm["protein_expression"] = raw.obsm["protein_expression"].iloc[:, :0]
    with pytest.raises(TotalVIDataError, match="no protein"):
        _setup(raw)


def test_cells_without_rna_counts(raw):
    X = raw.X.toarray()
    X[5] = 0
    raw.X = sp.csr_matrix(X)
    with pytest.raises(TotalVIDataError, match=raw.obs_names[5]):
        _setup(raw)


def test_setup_only_writes_its_registry(raw):
    before = raw.copy()
    _setup(raw)
    assert set(raw.uns) - set(before.uns) == {"_pyro_totalvi"}
    assert (raw.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(raw.obs, before.obs)
    pd.testing.assert_frame_equal(raw.obsm["protein_expression"],
                                  before.obsm["protein_expression"])


def test_query_adata_checked_against_training(trained, sim_adata):
    q = sim_adata[:20].copy()
    q.obs["batch"] = pd.Categorical(["batch_9"] * 20)
    with pytest.raises(TotalVIDataError, match="batch_9"):
        trained.get_latent_representation(q)
    q = sim_adata[:20, :-1].copy()
    with pytest.raises(TotalVIDataError, match="genes differ"):
        trained.get_latent_representation(q)
    q = sim_adata[:20].copy()
    q.obsm["protein_expression"] = q.obsm["protein_expression"].iloc[:, 1:]
    with pytest.raises(TotalVIDataError, match="proteins differ"):
        trained.get_latent_representation(q)
    # a valid query with a subset of the batches works and matches the training-data result
    q = sim_adata[:20].copy()
    np.testing.assert_allclose(trained.get_latent_representation(q),
                               trained.get_latent_representation(indices=np.arange(20)),
                               atol=1e-5)


def test_missing_proteins_detected_per_batch():
    a = simulate(200, n_genes=30, n_proteins=6, n_batches=2, seed=0)
    pro = a.obsm["protein_expression"]
    pro.loc[(a.obs["batch"] == "batch_1").to_numpy(), ["protein_1", "protein_4"]] = 0
    TOTALVI.setup_anndata(a, batch_key="batch")
    m = TOTALVI(a, n_hidden=16)
    measured = m.data.protein_measured
    assert measured[0].all()
    assert list(np.flatnonzero(~measured[1])) == [1, 4]
