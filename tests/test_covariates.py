"""Extra categorical and continuous covariates besides the batch."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pyro_totalvi import TOTALVI, TotalVIDataError, TotalVIModule, simulate
from pyro_totalvi.data import CiteData

pytestmark = pytest.mark.usefixtures("one_thread")

def _adata(n=200, seed=0):
    a = simulate(n, n_genes=40, n_proteins=6, n_batches=2, seed=seed)
    rng = np.random.default_rng(seed)
    a.obs["donor"] = pd.Categorical(rng.choice(["d2", "d1", "d3"], n), categories=["d2", "d1", "d3"])
    a.obs["chemistry"] = rng.choice(["v2", "v3"], n)  # plain strings
    a.obs["pct_mito"] = rng.random(n)
    a.obs["n_genes_scaled"] = rng.integers(0, 5, n)  # integers count as continuous
    return a


def _setup(a, **kw):
    TOTALVI.setup_anndata(a, batch_key="batch",
                          categorical_covariate_keys=kw.pop("cat", ["donor", "chemistry"]),
                          continuous_covariate_keys=kw.pop("cont", ["pct_mito", "n_genes_scaled"]),
                          **kw)


def test_registry_and_covariate_matrix():
    a = _adata()
    _setup(a)
    reg = a.uns["_pyro_totalvi"]
    assert reg["categorical_covariate_keys"] == ["donor", "chemistry"]
    assert reg["categorical_covariate_categories"] == {"donor": ["d2", "d1", "d3"],
                                                        "chemistry": ["v2", "v3"]}
    assert reg["continuous_covariate_keys"] == ["pct_mito", "n_genes_scaled"]
    json.dumps(reg)  # plain values only
    data = CiteData(a)
    assert data.n_covariates == 3 + 2 + 2
    cov = data.covariates
    np.testing.assert_array_equal(cov[:, :3].argmax(1),
                                  a.obs["donor"].map({"d2": 0, "d1": 1, "d3": 2}).to_numpy())
    np.testing.assert_array_equal(cov[:, 3:5].argmax(1), (a.obs["chemistry"] == "v3").to_numpy())
    np.testing.assert_allclose(cov[:, 5], a.obs["pct_mito"], rtol=1e-6)
    np.testing.assert_allclose(cov[:, 6], a.obs["n_genes_scaled"])
    assert (cov[:, :5].sum(1) == 2).all()
    mb = data.minibatch(np.array([5, 1, 3]))
    assert mb.args()[4] is mb.covariates
    np.testing.assert_allclose(mb.covariates.numpy(), cov[[1, 3, 5]])


def test_train_and_query_with_covariates(tmp_path):
    a = _adata()
    _setup(a)
    m = TOTALVI(a, n_latent=4, n_hidden=16)
    assert m.module.n_covariates == 7
    assert "7 covariate columns" in repr(m)
    m.train(max_epochs=3, batch_size=64, seed=0, progress_bar=False)
    assert np.isfinite(m.history["elbo_train"]).all()
    rna, pro = m.get_normalized_expression(transform_batch="batch_0", n_samples=2)
    assert rna.shape == (200, 40) and np.isfinite(pro.to_numpy()).all()
    assert np.isfinite(m.get_elbo())
    assert m.get_protein_foreground_probability(n_samples=2).shape == (200, 6)
    de = m.differential_expression(groupby="group", group1="group_0", n_samples=50)
    assert len(de) == 46
    # transform_batch refers to batch_key only
    with pytest.raises(TotalVIDataError, match="d1"):
        m.get_normalized_expression(transform_batch="d1")
    # save / load: the covariate registry goes to settings.json
    m.save(tmp_path / "model")
    saved = json.loads((tmp_path / "model" / "settings.json").read_text())["registry"]
    assert saved["categorical_covariate_categories"]["donor"] == ["d2", "d1", "d3"]
    fresh = _adata()  # not registered
    loaded = TOTALVI.load(tmp_path / "model", fresh)
    mb = m.data.minibatch(np.arange(50), m.device)  # the device the model trained on
    mb2 = loaded.data.minibatch(np.arange(50), loaded.device)
    np.testing.assert_allclose(mb.covariates.cpu().numpy(), mb2.covariates.cpu().numpy())
    with torch.no_grad():
        np.testing.assert_allclose(m.module.encode(*mb.args())[0].cpu().numpy(),
                                   loaded.module.encode(*mb2.args())[0].cpu().numpy(), atol=1e-5)


def test_latent_representation_with_covariates():
    a = _adata()
    _setup(a)
    m = TOTALVI(a, n_latent=4, n_hidden=16)
    m.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)
    z = m.get_latent_representation()
    assert z.shape == (200, 4) and np.isfinite(z).all()
    assert m.get_latent_library_size().shape == (200, 1)


def test_covariates_reach_the_generative_networks():
    a = _adata()
    _setup(a)
    m = TOTALVI(a, n_latent=4, n_hidden=16).module.eval()
    mb = CiteData(a).minibatch(np.arange(30))
    z = torch.zeros(30, 4)
    cov = m.network_input(mb.s, mb.covariates)
    other = mb.covariates.clone()
    other[:, :3] = torch.tensor([0.0, 0.0, 1.0])  # every cell from donor d3
    with torch.no_grad():
        rho_a = m.decoder(z, cov)[0]
        rho_b = m.decoder(z, m.network_input(mb.s, other))[0]
    assert not torch.allclose(rho_a, rho_b)


@pytest.mark.parametrize("encode", [True, False])
def test_encode_covariates(encode):
    a = _adata()
    _setup(a)
    m = TOTALVI(a, n_latent=4, n_hidden=16, encode_covariates=encode)
    assert m.init_params["encode_covariates"] is encode
    module = m.module.eval()
    first = module.encoder.body.linears[0]
    n_in = 40 + 6 + (2 + 7 if encode else 0)  # counts (+ one-hot batch + covariates)
    assert first.in_features == n_in
    mb = m.data.minibatch(np.arange(30))
    args = list(mb.args())
    changed = list(args)
    changed[2] = 1 - args[2]  # other batch
    changed[4] = args[4].flip(0)  # other covariates
    with torch.no_grad():
        same = torch.allclose(module.encode(*args)[0], module.encode(*changed)[0])
    assert same is (not encode)  # without encode_covariates the encoder sees neither


def test_module_checks_covariate_width():
    m = TotalVIModule(10, 3, 2, n_latent=2, n_covariates=3, n_hidden=8)
    x, y = torch.ones(4, 10), torch.ones(4, 3)
    s = torch.eye(2)[[0, 1, 0, 1]]
    with pytest.raises(ValueError, match="n_covariates=3"):
        m.guide(x, y, s, torch.zeros(4, 1))
    with pytest.raises(ValueError, match="n_covariates=3"):
        m.guide(x, y, s, torch.zeros(4, 1), covariates=torch.zeros(4, 2))
    m.guide(x, y, s, torch.zeros(4, 1), covariates=torch.zeros(4, 3))


def test_unknown_category_in_query_names_column_and_category():
    a = _adata()
    _setup(a)
    m = TOTALVI(a, n_latent=4, n_hidden=16)
    q = _adata(50, seed=1)
    q.obs["donor"] = pd.Categorical(["d1"] * 49 + ["d9"])
    with pytest.raises(TotalVIDataError, match=r"'donor'.*d9"):
        m.get_normalized_expression(q)
    # a query with a subset of the categories is fine and keeps the training encoding
    q.obs["donor"] = pd.Categorical(["d3"] * 50)
    data = m._data(q)
    np.testing.assert_array_equal(data.covariates[:, :3], np.tile([0, 0, 1], (50, 1)))
    del q.obs["pct_mito"]
    with pytest.raises(KeyError, match="pct_mito"):
        m._data(q)


def test_bad_covariates_are_named():
    a = _adata()
    a.obs.loc[a.obs_names[7], "pct_mito"] = np.nan
    with pytest.raises(TotalVIDataError, match=f"pct_mito.*{a.obs_names[7]}"):
        _setup(a)
    a = _adata()
    a.obs.loc[a.obs_names[3], "pct_mito"] = np.inf
    with pytest.raises(TotalVIDataError, match=f"pct_mito.*{a.obs_names[3]}"):
        _setup(a)
    a = _adata()
    with pytest.raises(TotalVIDataError, match="chemistry.*dtype"):
        _setup(a, cont=["chemistry"], cat=[])
    a = _adata()
    a.obs["donor"] = a.obs["donor"].cat.add_categories("x")
    a.obs.loc[a.obs_names[4], "donor"] = np.nan
    with pytest.raises(TotalVIDataError, match=f"donor.*{a.obs_names[4]}"):
        _setup(a)
    a = _adata()
    with pytest.raises(KeyError, match="age"):
        _setup(a, cont=["age"])
    with pytest.raises(ValueError, match="batch"):
        _setup(a, cat=["batch"])
    with pytest.raises(ValueError, match="more than once"):
        _setup(a, cat=["donor", "donor"])


def test_write_h5ad_keeps_the_registry(tmp_path):
    import anndata as ad

    a = _adata()
    _setup(a)
    a.write_h5ad(tmp_path / "a.h5ad")
    b = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(CiteData(b).covariates, CiteData(a).covariates)
    # and without covariates (empty key lists come back as empty arrays)
    a = _adata()
    TOTALVI.setup_anndata(a, batch_key="batch")
    a.write_h5ad(tmp_path / "b.h5ad")
    assert CiteData(ad.read_h5ad(tmp_path / "b.h5ad")).covariates is None
