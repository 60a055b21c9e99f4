"""Proteins missing from some batches: user masks, masked likelihood, imputation across panels.

The imputation tests print the per-protein Spearman correlations they measure (``pytest -s``).
Baselines, for proteins hidden in one batch and imputed from the batch that measured them:

- the issue's baseline, "the mean of that protein in the measuring batch, for every cell": a
  constant, so its Spearman correlation with anything is undefined; it is counted as 0;
- a stronger one: k-nearest-neighbour regression (k=15) of ``log1p`` protein counts on the first
  20 principal components of ``log1p`` normalised RNA, fitted on the measuring batch's cells.
"""

import logging

import anndata as ad
import numpy as np
import pandas as pd
import pyro
import pytest
from pyro.infer import Trace_ELBO, TraceEnum_ELBO
from scipy.stats import spearmanr

from pyro_totalvi import TOTALVI, TotalVIDataError, simulate
from pyro_totalvi.__main__ import _select_genes
from pyro_totalvi.data import CiteData

from .conftest import shared_file

pytestmark = pytest.mark.usefixtures("one_thread")


def _small(seed=0, n=200):
    return simulate(n, n_genes=40, n_proteins=6, n_batches=2, seed=seed)


def _mask_frame(a, missing_in_batch_1):
    mask = pd.DataFrame(True, index=["batch_0", "batch_1"],
                        columns=a.obsm["protein_expression"].columns)
    mask.loc["batch_1", missing_in_batch_1] = False
    return mask


# ---------------------------------------------------------------------------------------------
# the user's mask
def test_batch_mask_is_registered_and_used_instead_of_detection(tmp_path):
    a = _small()
    # protein_2 is all zero in batch_1 but declared measured there: the user's mask wins
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    a.obsm["protein_expression"].loc[b1, "protein_2"] = 0
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask=_mask_frame(a, ["protein_1"]))
    reg = a.uns["_pyro_totalvi"]
    assert reg["protein_mask"] == [[True] * 6, [True, False, True, True, True, True]]
    data = CiteData(a)
    assert list(np.flatnonzero(~data.protein_measured[1])) == [1]
    assert data.protein_measured[0].all()
    mb = data.minibatch(np.arange(20))
    np.testing.assert_array_equal(mb.protein_mask.numpy(), data.protein_measured[data.batch[:20]])
    # the registry survives write_h5ad
    a.write_h5ad(tmp_path / "a.h5ad")
    back = ad.read_h5ad(tmp_path / "a.h5ad")
    np.testing.assert_array_equal(CiteData(back).protein_measured, data.protein_measured)


def test_masked_proteins_are_warned_about(caplog):
    """Visible by default (WARNING), one line per batch naming the proteins and why."""
    a = _small()
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    a.obsm["protein_expression"].loc[b1, ["protein_2", "protein_4"]] = 0
    TOTALVI.setup_anndata(a, batch_key="batch")
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        TOTALVI(a, n_latent=4, n_hidden=16)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage() == (
        "batch 'batch_1': 2 of 6 proteins treated as not measured (all zero in every cell "
        "there; pass protein_mask to say which were measured): protein_2, protein_4")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        b = _small()
        TOTALVI.setup_anndata(b, batch_key="batch", protein_mask=_mask_frame(b, ["protein_1"]))
        TOTALVI(b, n_latent=4, n_hidden=16)
    assert [r.getMessage() for r in caplog.records] == [
        "batch 'batch_1': 1 of 6 proteins treated as not measured (as protein_mask says): "
        "protein_1"]


def test_array_mask_and_obsm_mask():
    a = _small()
    arr = np.ones((2, 6), dtype=int)
    arr[1, [0, 5]] = 0
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask=arr)
    assert list(np.flatnonzero(~CiteData(a).protein_measured[1])) == [0, 5]
    # cells x proteins, per cell: not constant within a batch, kept per cell
    cell_mask = np.ones((a.n_obs, 6), dtype=bool)
    cell_mask[:10, 3] = False
    a.obsm["measured"] = cell_mask
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask="measured")
    assert a.uns["_pyro_totalvi"]["protein_mask_obsm_key"] == "measured"
    data = CiteData(a)
    assert data.cell_protein_mask is not None
    mb = data.minibatch(np.arange(15))
    np.testing.assert_array_equal(mb.protein_mask.numpy(), cell_mask[:15])


@pytest.mark.parametrize(
    "mask,match",
    [
        (np.ones((3, 6), bool), "shape"),
        (pd.DataFrame(True, index=["batch_0", "batch_9"], columns=[f"protein_{i}" for i in range(6)]),
         "batch_9"),
        (pd.DataFrame(True, index=["batch_0", "batch_1"], columns=[f"protein_{i}" for i in range(5)]),
         "protein_5"),
        (np.full((2, 6), 0.5), "boolean"),
    ],
)
def test_bad_masks_are_named(mask, match):
    a = _small()
    with pytest.raises(TotalVIDataError, match=match):
        TOTALVI.setup_anndata(a, batch_key="batch", protein_mask=mask)


def test_missing_obsm_mask_key():
    a = _small()
    with pytest.raises(KeyError, match="not_there"):
        TOTALVI.setup_anndata(a, batch_key="batch", protein_mask="not_there")


# ---------------------------------------------------------------------------------------------
# the likelihood ignores masked counts (through TOTALVI and CiteData)
@pytest.mark.parametrize("mixture", ["marginal", "enumerate"])
def test_masked_counts_do_not_change_the_elbo(mixture):
    a = _small(n=120)
    TOTALVI.setup_anndata(a, batch_key="batch",
                          protein_mask=_mask_frame(a, ["protein_0", "protein_4"]))
    m = TOTALVI(a, n_latent=4, n_hidden=16, protein_mixture=mixture)
    m.train(max_epochs=2, batch_size=64, seed=0, progress_bar=False)  # runs with the mask
    assert np.isfinite(m.history["elbo_train"]).all()
    m.module.eval()
    elbo = TraceEnum_ELBO(max_plate_nesting=2) if mixture == "enumerate" else Trace_ELBO()
    b1 = (a.obs["batch"] == "batch_1").to_numpy()

    def loss(adata):
        mb = m._data(adata).minibatch(np.arange(adata.n_obs), m.device)
        pyro.set_rng_seed(0)
        return elbo.loss(m.module.model, m.module.guide, *mb.args())

    base = loss(a)
    other = a.copy()
    pro = other.obsm["protein_expression"]
    pro.loc[b1, ["protein_0", "protein_4"]] = pro.loc[b1, ["protein_0", "protein_4"]] * 7 + 3
    assert loss(other) == pytest.approx(base, rel=1e-6)
    # a measured protein does change it
    pro.loc[b1, "protein_1"] += 5
    assert abs(loss(other) - base) > 1.0


# ---------------------------------------------------------------------------------------------
# imputation
def _spearman_per_column(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    return np.array([spearmanr(pred[:, j], truth[:, j])[0] for j in range(truth.shape[1])])


def _knn_baseline(adata, proteins: np.ndarray, source: np.ndarray, target: np.ndarray):
    """kNN regression of log1p protein counts on log1p-RNA principal components."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsRegressor

    X = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    X = X.astype(np.float64)
    X = np.log1p(X / X.sum(1, keepdims=True) * 1e4)
    pcs = PCA(20, random_state=0).fit_transform(X)
    knn = KNeighborsRegressor(15).fit(pcs[source], np.log1p(proteins[source]))
    return knn.predict(pcs[target])


def _report(name, hidden, ours, knn):
    print(f"\n{name}: Spearman of imputed vs hidden counts, per hidden protein")
    print(pd.DataFrame({"totalVI": ours, "kNN on RNA PCA": knn,
                        "batch mean (constant)": np.nan}, index=hidden).round(3).to_string())
    print(f"median: totalVI {np.median(ours):.3f}, kNN {np.median(knn):.3f}, "
          "constant batch mean undefined (= 0)")


@pytest.mark.slow
def test_impute_hidden_proteins_on_simulated_data():
    a = simulate(1000, n_genes=200, n_proteins=15, n_batches=2, n_groups=5, seed=2)
    pro = a.obsm["protein_expression"]
    hidden = [f"protein_{t}" for t in range(0, 15, 3)]  # a third of the panel
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    truth = pro.loc[b1, hidden].to_numpy().copy()
    pro.loc[b1, hidden] = 0  # not measured in batch_1: detected automatically
    TOTALVI.setup_anndata(a, batch_key="batch")
    m = TOTALVI(a, n_latent=10, n_hidden=128)
    assert list(np.flatnonzero(~m.data.protein_measured[1])) == [0, 3, 6, 9, 12]
    m.train(max_epochs=80, seed=0, progress_bar=False)
    _, imputed = m.get_normalized_expression(indices=np.flatnonzero(b1), transform_batch="batch_0",
                                             protein_list=hidden, n_samples=10)
    assert np.isfinite(imputed.to_numpy()).all() and (imputed.to_numpy() >= 0).all()
    ours = _spearman_per_column(imputed.to_numpy(), truth)
    knn = _spearman_per_column(
        _knn_baseline(a, pro[hidden].to_numpy(), ~b1, b1), truth)
    _report("simulated (1000 cells, 5 of 15 proteins hidden in batch_1)", hidden, ours, knn)
    assert np.median(ours) > 0.5  # the constant baseline has none
    assert np.median(ours) > np.median(knn) - 0.05


@pytest.mark.slow
def test_impute_hidden_proteins_on_eccite():
    path = shared_file("eccite_pbmc_500.h5ad")
    a = _select_genes(ad.read_h5ad(path), 2000)
    rng = np.random.default_rng(0)
    a.obs["pseudo_batch"] = pd.Categorical(np.where(rng.random(a.n_obs) < 0.5, "A", "B"))
    pro = a.obsm["protein_expression"].copy()
    candidates = [p for p in pro.columns if p not in set(a.uns["isotype_controls"])]
    # the 10 most variable antibodies (log1p counts): the markers one would want imputed
    hidden = list(np.log1p(pro[candidates]).var().sort_values(ascending=False).index[:10])
    B = (a.obs["pseudo_batch"] == "B").to_numpy()
    truth = pro.loc[B, hidden].to_numpy().copy()
    pro.loc[B, hidden] = 0
    a.obsm["protein_expression"] = pro
    TOTALVI.setup_anndata(a, batch_key="pseudo_batch")
    m = TOTALVI(a, n_latent=10, n_hidden=128)
    m.train(max_epochs=200, seed=0, progress_bar=False)
    _, imputed = m.get_normalized_expression(indices=np.flatnonzero(B), transform_batch="A",
                                             protein_list=hidden, n_samples=20)
    ours = _spearman_per_column(imputed.to_numpy(), truth)
    knn = _spearman_per_column(_knn_baseline(a, pro[hidden].to_numpy(), ~B, B), truth)
    _report("eccite_pbmc_500 (random halves; 10 most variable antibodies hidden in B)",
            hidden, ours, knn)
    assert np.median(ours) > 0.4  # the constant baseline has none
    assert np.median(ours) > np.median(knn) - 0.2


@pytest.mark.slow
def test_two_real_panels_train_and_impute():
    path = shared_file("pbmc10k5k_two_panels.h5ad")
    a = _select_genes(ad.read_h5ad(path), 1000)
    TOTALVI.setup_anndata(a, batch_key="batch", protein_mask="protein_measured")
    m = TOTALVI(a, n_latent=10, n_hidden=128)
    assert m.data.protein_measured.sum(1).tolist() == [14, 29]  # pbmc_10k, pbmc_5k
    m.train(max_epochs=100, seed=0, progress_bar=False)
    c10 = np.flatnonzero((a.obs["batch"] == "pbmc_10k").to_numpy())
    _, imputed = m.get_normalized_expression(indices=c10, transform_batch="pbmc_5k",
                                             n_samples=10)
    assert imputed.shape == (200, 29)
    values = imputed.to_numpy()
    assert np.isfinite(values).all() and (values >= 0).all()
    missing = [p for p in imputed.columns if p not in set(a.uns["protein_panels"]["pbmc_10k"])]
    assert len(missing) == 15 and (imputed[missing].std() > 0).all()
    # an imputed marker follows a measured marker of the same cells
    observed = a.obsm["protein_expression"].iloc[c10]
    pairs = [("CD11b_TotalSeqB", "CD14_TotalSeqB"), ("CD27_TotalSeqB", "CD3_TotalSeqB")]
    rho = {f"{i} ~ {o}": spearmanr(imputed[i], observed[o])[0] for i, o in pairs}
    print("\npbmc10k5k: imputed (10k cells) vs measured marker:", {k: round(v, 3) for k, v in
                                                                   rho.items()})
    assert min(rho.values()) > 0.2
