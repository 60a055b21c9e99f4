"""Training and queries on a backed .h5ad: minibatches read from disk, never the whole matrix."""

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from pyro_totalvi import TOTALVI, TotalVIDataError
from pyro_totalvi.data import BackedCSR, CiteData


@pytest.fixture
def backed(sim_adata, tmp_path):
    path = tmp_path / "sim.h5ad"
    sim_adata.write_h5ad(path)
    a = ad.read_h5ad(path, backed="r")
    yield a
    a.file.close()


def test_backed_rows_equal_in_memory_rows(backed, sim_adata):
    X = BackedCSR(backed.file["X"])
    idx = np.array([0, 1, 2, 7, 8, 100, 599])
    np.testing.assert_array_equal(X[idx].toarray(), sim_adata.X[idx].toarray())
    np.testing.assert_allclose(X.sum(axis=1), np.asarray(sim_adata.X.sum(1)).ravel())
    np.testing.assert_allclose(X.sum(axis=0), np.asarray(sim_adata.X.sum(0)).ravel(), rtol=1e-6)
    with pytest.raises(ValueError, match="increasing"):
        X[np.array([3, 1])]


def test_train_and_query_backed_match_in_memory(backed, sim_adata, tmp_path):
    TOTALVI.setup_anndata(backed, batch_key="batch")
    assert isinstance(CiteData(backed).X, BackedCSR)
    m = TOTALVI(backed, n_latent=5, n_hidden=32)
    m.train(max_epochs=2, progress_bar=False)
    assert np.isfinite(m.history["elbo_validation"]).all()
    m.save(tmp_path / "model")
    mem = sim_adata.copy()
    loaded = TOTALVI.load(tmp_path / "model", mem)
    np.testing.assert_allclose(m.get_latent_representation(), loaded.get_latent_representation(),
                               atol=1e-5)
    rna, _ = m.get_normalized_expression(indices=np.arange(50))
    assert rna.shape == (50, sim_adata.n_vars) and np.isfinite(rna.to_numpy()).all()


def test_backed_bad_counts_name_the_cell(sim_adata, tmp_path):
    a = sim_adata.copy()
    X = a.X.toarray()
    X[42, 3] = -2
    a.X = sp.csr_matrix(X)
    a.write_h5ad(tmp_path / "bad.h5ad")
    b = ad.read_h5ad(tmp_path / "bad.h5ad", backed="r")
    with pytest.raises(TotalVIDataError, match=a.obs_names[42]):
        TOTALVI.setup_anndata(b, batch_key="batch")
    b.file.close()
