"""MuData input: setup_mudata, training and every adata-taking method on the MuData."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pyro_totalvi import TOTALVI, TotalVIDataError, simulate

md = pytest.importorskip("mudata", reason="mudata is not installed (pip install mudata)")


pytestmark = pytest.mark.usefixtures("one_thread")


MODALITIES = {"rna_layer": "rna", "protein_layer": "prot", "batch_key": "rna"}


def _mdata(n=200, seed=0, shuffle_proteins=True):
    a = simulate(n, n_genes=40, n_proteins=6, n_batches=2, seed=seed)
    rna = ad.AnnData(X=a.X.copy(), obs=a.obs[["batch", "group"]].copy(), var=a.var.copy())
    rna.layers["counts"] = a.X.copy()
    rna.X = rna.X * 0.5  # "normalised" X: the counts are in the layer
    pro = a.obsm["protein_expression"]
    prot = ad.AnnData(X=pro.to_numpy(), obs=pd.DataFrame(index=a.obs_names),
                      var=pd.DataFrame(index=pro.columns))
    if shuffle_proteins:  # another cell order in the protein modality
        prot = prot[np.random.default_rng(seed).permutation(n)].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        mdata = md.MuData({"rna": rna, "prot": prot})
    return mdata, a


def test_mudata_round_trip(tmp_path):
    mdata, a = _mdata()
    TOTALVI.setup_mudata(mdata, rna_layer="counts", batch_key="batch", modalities=MODALITIES)
    reg = mdata.uns["_pyro_totalvi"]
    assert reg["mudata"]["modalities"]["protein_layer"] == "prot"
    assert set(mdata.uns) == {"_pyro_totalvi"}
    m = TOTALVI(mdata, n_latent=4, n_hidden=16)
    assert m.mdata is mdata and m.adata.n_vars == 40
    # the proteins were put in the RNA modality's cell order
    np.testing.assert_array_equal(m.data.Y, a.obsm["protein_expression"].to_numpy())
    m.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)
    z = m.get_latent_representation()
    np.testing.assert_array_equal(z, m.get_latent_representation(mdata))
    rna, pro = m.get_normalized_expression(mdata, transform_batch="batch_0", n_samples=2)
    assert rna.shape == (200, 40) and pro.shape == (200, 6)
    assert list(rna.index) == list(mdata.obs_names)
    assert np.isfinite(m.get_elbo(mdata))
    de = m.differential_expression(groupby="group", group1="group_0", n_samples=50)
    assert len(de) == 46

    m.save(tmp_path / "model")
    mdata.write(tmp_path / "m.h5mu")
    back = md.read_h5mu(tmp_path / "m.h5mu")
    loaded = TOTALVI.load(tmp_path / "model", back)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-5)
    # an unregistered MuData is registered with the saved settings
    fresh, _ = _mdata()
    loaded = TOTALVI.load(tmp_path / "model", fresh)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-5)
    # an AnnData in the model's layout (counts in X, proteins in obsm) works too
    loaded = TOTALVI.load(tmp_path / "model", a)
    np.testing.assert_allclose(loaded.get_latent_representation(), z, atol=1e-5)


def test_mudata_covariates_from_mdata_obs_and_query():
    mdata, a = _mdata()
    mdata.obs["donor"] = pd.Categorical(np.where(np.arange(200) % 2, "d1", "d2"))
    mdata.mod["rna"].obs["pct"] = np.linspace(0, 1, 200)
    TOTALVI.setup_mudata(mdata, rna_layer="counts", batch_key="batch",
                         categorical_covariate_keys=["donor"], continuous_covariate_keys=["pct"],
                         modalities={**MODALITIES, "continuous_covariate_keys": "rna"})
    m = TOTALVI(mdata, n_latent=4, n_hidden=16)
    assert m.data.n_covariates == 3
    m.train(max_epochs=1, batch_size=64, seed=0, progress_bar=False)
    q, _ = _mdata(50, seed=1)
    q.obs["donor"] = pd.Categorical(["d9"] * 50)
    q.mod["rna"].obs["pct"] = 0.5
    with pytest.raises(TotalVIDataError, match="d9"):
        m.get_normalized_expression(q)


def test_setup_mudata_errors():
    mdata, _ = _mdata()
    with pytest.raises(KeyError, match="protein"):
        TOTALVI.setup_mudata(mdata, modalities={"rna_layer": "rna", "protein_layer": "protein"})
    with pytest.raises(ValueError, match="not arguments"):
        TOTALVI.setup_mudata(mdata, modalities={**MODALITIES, "labels_key": "rna"})
    with pytest.raises(KeyError, match="donor"):
        TOTALVI.setup_mudata(mdata, batch_key="donor", modalities=MODALITIES)
    # cells missing from the protein modality
    rna, prot = mdata.mod["rna"], mdata.mod["prot"][:150].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        partial = md.MuData({"rna": rna, "prot": prot})
    with pytest.raises(TotalVIDataError, match="intersect_obs"):
        TOTALVI.setup_mudata(partial, rna_layer="counts", modalities=MODALITIES)
    with pytest.raises(TotalVIDataError, match="setup_mudata"):
        TOTALVI(_mdata()[0])
