"""Reference mapping (scArches): surgery, freezing, RNA-only queries, save/load, bad input."""

import logging

import numpy as np
import pandas as pd
import pyro
import pytest
import scipy.sparse as sp
import torch

from pyro_totalvi import TOTALVI, TotalVIDataError, simulate
from pyro_totalvi.data import REGISTRY_KEY, CiteData

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = dict(n_latent=4, n_hidden=32)


def _data(n=360, seed=3, **kw):
    """Three batches of simulated cells; a ``donor`` covariate with a category only in batch_2."""
    a = simulate(n, n_genes=50, n_proteins=8, n_batches=3, n_groups=3, seed=seed, **kw)
    donor = np.where(np.arange(a.n_obs) % 2 == 0, "d0", "d1").astype(object)
    donor[(a.obs["batch"] == "batch_2").to_numpy()] = "d2"
    a.obs["donor"] = pd.Categorical(donor)
    return a


def _part(a, batches):
    part = a[a.obs["batch"].isin(batches).to_numpy()].copy()
    part.obs["batch"] = part.obs["batch"].cat.remove_unused_categories()
    part.obs["donor"] = part.obs["donor"].cat.remove_unused_categories()
    return part


@pytest.fixture(scope="module")
def cells():
    return _data()


@pytest.fixture(scope="module")
def reference(cells):
    """A model trained on batch_0 and batch_1 (with proteins) and its AnnData."""
    ref = _part(cells, ["batch_0", "batch_1"])
    TOTALVI.setup_anndata(ref, batch_key="batch", categorical_covariate_keys=["donor"])
    model = TOTALVI(ref, **SMALL)
    model.train(max_epochs=3, batch_size=64, progress_bar=False)
    return model, ref


def _query(cells, batches=("batch_2",), proteins=True):
    q = _part(cells, list(batches))
    if not proteins:
        del q.obsm["protein_expression"]
    return q


def _elbo(model, adata):
    pyro.set_rng_seed(0)
    return model.get_elbo(adata)


def _same_elbo(a: float, b: float) -> bool:
    """Equal up to float32 rounding: get_elbo sums per-cell terms in float64, and the query's
    networks have extra (zero-weight) input columns, which may move a float32 decoder output
    by one unit in the last place."""
    return a == pytest.approx(b, rel=1e-7, abs=0)


# ---------------------------------------------------------------------------------------------
# the surgery
def test_surgery_keeps_the_reference_exactly(cells, reference):
    """Before and after query training, the query model scores the reference's cells exactly as
    the reference does (every reference weight, prior and BatchNorm statistic kept)."""
    model, ref = reference
    ref_state = {k: v.clone() for k, v in model.module.state_dict().items()}
    query = _query(cells)
    q = TOTALVI.load_query_data(query, model, freeze_batchnorm_decoder=True)
    assert list(q.registry["batch_categories"]) == ["batch_0", "batch_1", "batch_2"]
    assert list(q.registry["categorical_covariate_categories"]["donor"]) == ["d0", "d1", "d2"]
    assert not q.is_trained and q.module.n_batches == 3 and q.module.n_covariates == 3
    np.testing.assert_array_equal(q.get_latent_representation(ref),
                                  model.get_latent_representation(ref))
    assert _same_elbo(_elbo(q, ref), _elbo(model, ref))
    q.train(max_epochs=4, batch_size=64, progress_bar=False)  # default weight_decay 1e-6
    assert _same_elbo(_elbo(q, ref), _elbo(model, ref))
    for name, value in model.module.state_dict().items():  # the reference model is untouched
        assert torch.equal(value, ref_state[name]), name


@pytest.mark.parametrize("optimizer", ["Adam", "AdamW"])  # coupled and decoupled weight decay
def test_frozen_entries_unchanged_bit_for_bit_new_ones_trained(cells, reference, optimizer):
    model, _ = reference
    ref_state = model.module.state_dict()
    q = TOTALVI.load_query_data(_query(cells), model, freeze_batchnorm_decoder=True)
    start = {k: v.clone() for k, v in q.module.state_dict().items()}
    masks = q.module.grad_masks
    # what is new: a column per new batch (and the new donor) in every layer reading s, and a
    # column of the background prior per new batch
    w = "decoder.rho.hidden.linears.0.weight"
    assert masks[w].sum(0).nonzero().ravel().tolist() == [4 + 2, 4 + 5]  # batch_2, donor d2
    assert masks["background_c"].sum(0).tolist() == [0, 0, 8]
    assert q.module.log_theta.requires_grad is False
    q.train(max_epochs=4, batch_size=64, progress_bar=False,
            plan_kwargs=dict(weight_decay=0.1, optimizer=optimizer))
    end = q.module.state_dict()
    for name, value in ref_state.items():
        if name in masks:
            assert torch.equal(end[name][~masks[name]], start[name][~masks[name]]), name
            changed = (end[name][masks[name]] != start[name][masks[name]]).float().mean()
            assert changed > 0.9, name  # the new entries are trained
        elif end[name].shape == value.shape:
            assert torch.equal(end[name], value), name  # incl. BatchNorm running statistics
    assert not torch.equal(end["library_log_means"][2:], torch.zeros(1))  # the query's own


def test_default_flags_train_decoder_batchnorm_only_besides_new_columns(cells, reference):
    model, _ = reference
    q = TOTALVI.load_query_data(_query(cells), model)
    start = {k: v.clone() for k, v in q.module.state_dict().items()}
    assert q.module.eval_during_training == ("encoder.body.norms.0", "encoder.body.norms.1")
    q.train(max_epochs=2, batch_size=64, progress_bar=False)
    end = q.module.state_dict()
    changed = {k for k in start if k not in q.module.grad_masks and
               not torch.equal(start[k], end[k])}
    assert changed and all(".norms." in k and not k.startswith("encoder.") for k in changed)


@pytest.mark.parametrize("flag,trainable", [
    ("freeze_expression", "encoder.body.linears.0.bias"),
    ("freeze_decoder_first_layer", "decoder.rho.hidden.linears.0.bias"),
    ("freeze_batchnorm_encoder", "encoder.body.norms.0.weight"),
])
def test_freeze_flags(cells, reference, flag, trainable):
    model, _ = reference
    q = TOTALVI.load_query_data(_query(cells), model, **{flag: False})
    params = dict(q.module.named_parameters())
    assert params[trainable].requires_grad and trainable not in q.module.grad_masks
    frozen = TOTALVI.load_query_data(_query(cells), model)
    assert not dict(frozen.module.named_parameters())[trainable].requires_grad
    un = TOTALVI.load_query_data(_query(cells), model, unfrozen=True, freeze_dropout=True)
    assert all(p.requires_grad for p in un.module.parameters()) and not un.module.grad_masks
    assert un.module.encoder.body.dropout == 0.0


def test_masked_weight_decay_is_adams(reference):
    """A mask that is all True must give Adam's own L2 weight decay (same trajectory)."""
    model, ref = reference
    runs = []
    for masked in (False, True):
        m = TOTALVI(ref, **SMALL)
        if masked:
            m.module.grad_masks = {n: torch.ones_like(p, dtype=torch.bool)
                                   for n, p in m.module.named_parameters() if p.dim() == 2}
        m.train(max_epochs=2, batch_size=64, progress_bar=False, weight_decay=0.5)
        runs.append(m.module.state_dict())
    for name, value in runs[0].items():
        torch.testing.assert_close(runs[1][name], value, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# proteins of a query
def test_rna_only_query_has_every_protein_unmeasured(cells, reference):
    model, _ = reference
    query = _query(cells, proteins=False)
    q = TOTALVI.load_query_data(query, model)
    assert "protein_expression" not in query.obsm  # not added behind the user's back
    assert not q.data.has_proteins and not q.data.protein_measured[2].any()
    mb = q.data.minibatch(np.arange(5))
    assert not mb.protein_mask.any()
    # all-zero proteins mean the same
    zeros = _query(cells)
    zeros.obsm["protein_expression"].loc[:, :] = 0
    assert not TOTALVI.load_query_data(zeros, model).data.protein_measured[2].any()


def test_query_measuring_a_subset(cells, reference, caplog):
    model, _ = reference
    query = _query(cells)
    query.obsm["protein_expression"] = query.obsm["protein_expression"][
        ["protein_5", "protein_1", "protein_2"]]
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        TOTALVI.prepare_query_anndata(query, model)
    assert "lacks 5 of the reference's 8 proteins" in caplog.text
    assert list(query.obsm["protein_expression"].columns) == [f"protein_{i}" for i in range(8)]
    q = TOTALVI.load_query_data(query, model)
    assert np.flatnonzero(q.data.protein_measured[2]).tolist() == [1, 2, 5]
    q.train(max_epochs=1, batch_size=64, progress_bar=False)
    _, prot = q.get_normalized_expression(query, transform_batch="batch_0")
    assert prot.shape == (query.n_obs, 8) and np.isfinite(prot.to_numpy()).all()


@pytest.mark.slow
def test_rna_only_query_imputes_proteins():
    """Reference: batch_0 with proteins; query: batch_1 without. Imputed proteins (decoded as
    batch_0) against the hidden counts; a constant (e.g. the reference mean) has no correlation,
    k-NN regression on RNA principal components is the stronger baseline."""
    from .test_missing_proteins import _knn_baseline

    a = simulate(800, n_genes=100, n_proteins=12, n_batches=2, n_groups=4, seed=1)
    b1 = (a.obs["batch"] == "batch_1").to_numpy()
    ref, query = a[~b1].copy(), a[b1].copy()
    truth = query.obsm["protein_expression"].to_numpy().copy()
    del query.obsm["protein_expression"]
    TOTALVI.setup_anndata(ref, batch_key="batch")
    model = TOTALVI(ref, n_latent=8, n_hidden=64)
    model.train(max_epochs=80, progress_bar=False)
    q = TOTALVI.load_query_data(query, model)
    q.train(max_epochs=60, plan_kwargs=dict(weight_decay=0.0), progress_bar=False)
    _, prot = q.get_normalized_expression(query, transform_batch="batch_0", n_samples=10)
    log_truth = np.log1p(truth)
    cor = [np.corrcoef(np.log1p(prot.to_numpy()[:, j]), log_truth[:, j])[0, 1]
           for j in range(truth.shape[1])]
    knn = _knn_baseline(a, a.obsm["protein_expression"].to_numpy(), ~b1, b1)
    cor_knn = [np.corrcoef(knn[:, j], log_truth[:, j])[0, 1] for j in range(truth.shape[1])]
    print(f"\nRNA-only query, Pearson of log1p imputed vs hidden: median {np.median(cor):.3f} "
          f"(kNN on RNA PCs {np.median(cor_knn):.3f}; a constant: undefined, 0)")
    assert np.median(cor) > 0.6
    assert np.median(cor) > np.median(cor_knn) - 0.15


# ---------------------------------------------------------------------------------------------
# the scvi-tools call sequence, save / load, a second query
def test_scvi_tools_call_sequence(tmp_path):
    a = simulate(300, n_genes=40, n_proteins=6, n_batches=2, seed=5)
    adata_ref = a[a.obs["batch"] == "batch_0"].copy()
    adata_query = a[a.obs["batch"] == "batch_1"].copy()
    adata_query.obsm["protein_expression"].loc[:, :] = 0  # RNA only, as scvi-tools' tutorial
    adata_query = adata_query[:, ::-1].copy()  # other gene order: prepare_query_anndata fixes it

    TOTALVI.setup_anndata(adata_ref, protein_expression_obsm_key="protein_expression",
                          batch_key="batch")
    vae_ref = TOTALVI(adata_ref, **SMALL)
    vae_ref.train(max_epochs=2)
    vae_ref.save(tmp_path / "ref")
    TOTALVI.prepare_query_anndata(adata_query, vae_ref)
    vae_q = TOTALVI.load_query_data(adata_query, vae_ref, freeze_expression=True)
    vae_q.train(max_epochs=2, plan_kwargs=dict(weight_decay=0.0))
    adata_query.obsm["X_totalvi"] = vae_q.get_latent_representation()
    _, imputed_proteins = vae_q.get_normalized_expression(
        adata_query, n_samples=5, return_mean=True, transform_batch=["batch_0"])
    assert adata_query.obsm["X_totalvi"].shape == (adata_query.n_obs, 4)
    assert imputed_proteins.shape == (adata_query.n_obs, 6)
    # the reference as a saved directory
    assert TOTALVI.prepare_query_anndata(adata_query, str(tmp_path / "ref"),
                                         return_reference_var_names=True).equals(
        adata_ref.var_names)
    vae_q2 = TOTALVI.load_query_data(adata_query, str(tmp_path / "ref"))
    assert list(vae_q2.registry["batch_categories"]) == ["batch_0", "batch_1"]


def test_save_load_and_a_second_query(cells, reference, tmp_path):
    model, ref = reference
    q1 = TOTALVI.load_query_data(_query(cells, ["batch_2"], proteins=False), model)
    q1.train(max_epochs=1, batch_size=64, progress_bar=False)
    q1.save(tmp_path / "q1")
    # loads for the RNA-only query (no protein table, not registered) and for the reference
    fresh = _query(cells, ["batch_2"], proteins=False)
    loaded = TOTALVI.load(tmp_path / "q1", fresh)
    assert list(loaded.registry["batch_categories"]) == ["batch_0", "batch_1", "batch_2"]
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  q1.get_latent_representation())
    on_ref = TOTALVI.load(tmp_path / "q1", ref.copy())
    np.testing.assert_allclose(on_ref.get_latent_representation(),
                               q1.get_latent_representation(ref))
    # a second query (new batch "batch_3") onto the saved query model
    q2_data = _query(cells, ["batch_1"])
    q2_data.obs["batch"] = pd.Categorical(["batch_3"] * q2_data.n_obs)
    q2 = TOTALVI.load_query_data(q2_data, str(tmp_path / "q1"), freeze_batchnorm_decoder=True)
    assert list(q2.registry["batch_categories"]) == ["batch_0", "batch_1", "batch_2", "batch_3"]
    before = _elbo(q2, fresh)
    q2.train(max_epochs=2, batch_size=64, progress_bar=False)
    assert _elbo(q2, fresh) == before == _elbo(q1, fresh)  # batch_2 (first query) kept exactly


def test_mudata_query(cells):
    md = pytest.importorskip("mudata")
    import anndata as ad

    def mudata_of(a):
        rna = ad.AnnData(a.X, obs=a.obs[["batch"]].copy(), var=a.var[[]].copy())
        pro = a.obsm["protein_expression"]
        prot = ad.AnnData(pro.to_numpy(), obs=a.obs[[]].copy(), var=pd.DataFrame(index=pro.columns))
        return md.MuData({"rna": rna, "prot": prot})

    ref = mudata_of(_part(cells, ["batch_0"]))
    TOTALVI.setup_mudata(ref, batch_key="batch",
                         modalities={"rna_layer": "rna", "protein_layer": "prot", "batch_key": "rna"})
    model = TOTALVI(ref, **SMALL)
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    query = mudata_of(_part(cells, ["batch_1"]))
    query.mod["prot"] = query.mod["prot"][:, 2:].copy()  # measured a subset
    names = TOTALVI.prepare_query_mudata(query, model, return_reference_var_names=True)
    assert list(names) == ["rna", "prot"] and len(names["prot"]) == 8
    copy = TOTALVI.prepare_query_mudata(query, model, inplace=False)
    assert copy.mod["prot"].n_vars == 8 and query.mod["prot"].n_vars == 6
    TOTALVI.prepare_query_mudata(query, model)
    assert list(query.mod["prot"].var_names) == [f"protein_{i}" for i in range(8)]
    q = TOTALVI.load_query_data(query, model)
    assert np.flatnonzero(~q.data.protein_measured[1]).tolist() == [0, 1]
    q.train(max_epochs=1, batch_size=64, progress_bar=False)
    assert q.get_latent_representation(query).shape == (query.n_obs, 4)


# ---------------------------------------------------------------------------------------------
# preparing the query
def test_prepare_query_anndata_pads_orders_and_drops(reference, cells, caplog):
    model, ref = reference
    query = _query(cells)
    query.layers["counts"] = query.X.copy()
    keep = list(query.var_names[5:][::-1]) + []
    sub = query[:, keep].copy()
    sub.var_names = list(sub.var_names[:-1]) + ["not_a_reference_gene"]
    original = sub.copy()
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        out = TOTALVI.prepare_query_anndata(sub, model, inplace=False)
    assert "6 of the reference's 50 genes are absent" in caplog.text
    assert out.var_names.equals(ref.var_names)
    assert sub.var_names.equals(original.var_names)  # inplace=False leaves it alone
    X, full = out.X.toarray(), query[:, ref.var_names].X.toarray()
    absent = ~ref.var_names.isin(sub.var_names)
    assert (X[:, absent] == 0).all()
    np.testing.assert_array_equal(X[:, ~absent], full[:, ~absent])
    np.testing.assert_array_equal(out.layers["counts"].toarray(), X)
    assert TOTALVI.prepare_query_anndata(sub, model) is None and sub.var_names.equals(
        ref.var_names)
    assert sp.issparse(sub.X) and sub.obsm["protein_expression"].shape == (sub.n_obs, 8)


# ---------------------------------------------------------------------------------------------
# bad input
def test_query_without_reference_genes(cells, reference):
    model, _ = reference
    query = _query(cells)
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    with pytest.raises(TotalVIDataError, match="none of the reference's 50 genes"):
        TOTALVI.prepare_query_anndata(query, model)
    with pytest.raises(TotalVIDataError, match="genes differ from the reference's"):
        TOTALVI.load_query_data(query, model)
    with pytest.raises(TotalVIDataError, match="needs every reference gene"):
        TOTALVI.load_query_data(query, model, inplace_subset_query_vars=True)


def test_query_with_other_proteins(cells, reference):
    model, _ = reference
    query = _query(cells)
    pro = query.obsm["protein_expression"]
    query.obsm["protein_expression"] = pro.set_axis([f"ADT_{c}" for c in pro.columns], axis=1)
    with pytest.raises(TotalVIDataError, match="ADT_protein_0.*prepare_query_anndata"):
        TOTALVI.load_query_data(query, model)
    with pytest.raises(TotalVIDataError, match="shares no protein names"):
        TOTALVI.prepare_query_anndata(query, model)
    query.obsm["protein_expression"] = pro[pro.columns[::-1]]
    with pytest.raises(TotalVIDataError, match="order differs"):
        TOTALVI.load_query_data(query, model)


def test_untrained_reference_and_nothing_to_train(cells, reference, tmp_path):
    model, ref = reference
    untrained = TOTALVI(ref, **SMALL)
    with pytest.raises(ValueError, match="not trained"):
        TOTALVI.load_query_data(_query(cells), untrained)
    untrained.save(tmp_path / "u")
    with pytest.raises(ValueError, match="not trained"):
        TOTALVI.load_query_data(_query(cells), str(tmp_path / "u"))
    same_batches = _query(cells, ["batch_1"])  # no new batch or covariate category
    with pytest.raises(ValueError, match="nothing to train"):
        TOTALVI.load_query_data(same_batches, model, freeze_batchnorm_decoder=True)
    with pytest.raises(TypeError, match="reference_model must be"):
        TOTALVI.load_query_data(same_batches, ref)
    # AdamW is a plan setting since the scvi-tools parity merge; an unknown one still raises
    with pytest.raises(TypeError, match="plan_kwargs"):
        model.train(max_epochs=1, plan_kwargs=dict(optimiser="AdamW"))


def test_registry_is_the_only_change_to_the_query(cells, reference):
    model, _ = reference
    query = _query(cells)
    before = query.copy()
    TOTALVI.load_query_data(query, model)
    assert set(query.uns) - set(before.uns) == {REGISTRY_KEY}
    assert query.obs.equals(before.obs) and (query.X != before.X).nnz == 0
    assert CiteData(query).n_batches == 3


# ---------------------------------------------------------------------------------------------
# extensions: the surgery follows the module's networks, not a list of names
class _WithExtraNetwork(__import__("pyro_totalvi").TotalVIModule):
    """A subclass with one more network reading ``s ⊕ covariates`` and a per-batch parameter
    (as a label model's classifier might have); ``query_roles`` names it a classifier."""

    query_roles = {"classifier": ("extra",)}

    def __init__(self, *args, **kwargs):
        from pyro_totalvi.nn import FCLayers

        super().__init__(*args, **kwargs)
        self.extra = FCLayers(self.n_latent, 3, self.n_batches + self.n_covariates, n_hidden=8)
        self.per_batch = torch.nn.Parameter(torch.randn(2, self.n_batches))


def test_subclass_networks_are_padded_and_roles_apply(cells):
    ref = _part(cells, ["batch_0"])
    TOTALVI.setup_anndata(ref, batch_key="batch")
    model = TOTALVI(ref, module_class=_WithExtraNetwork, **SMALL)
    model.train(max_epochs=1, batch_size=64, progress_bar=False)
    q = TOTALVI.load_query_data(_query(cells, ["batch_1"]), model)
    assert type(q.module) is _WithExtraNetwork
    masks = q.module.grad_masks
    assert masks["extra.linears.0.weight"][:, -1].all() and masks["per_batch"][:, 1].all()
    assert masks["extra.linears.0.weight"].sum() == 3 and masks["per_batch"].sum() == 2
    torch.testing.assert_close(q.module.per_batch[:, :1], model.module.per_batch)
    free = TOTALVI.load_query_data(_query(cells, ["batch_1"]), model, freeze_classifier=False)
    assert "extra.linears.0.weight" not in free.module.grad_masks
    assert free.module.extra.linears[0].bias.requires_grad


def test_scale_encoder_input_is_scvi_tools_input(adata):
    """scvi-tools 1.4 encodes log(1 + x / (1 + mean x)) and the same of y."""
    m = TOTALVI(adata, scale_encoder_input=True, empirical_protein_background_prior=False,
                **SMALL)
    seen = []
    m.module.encoder.body.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    m.get_latent_representation(indices=np.arange(7))
    x = adata.X[:7].toarray()
    y = adata.obsm["protein_expression"].to_numpy()[:7]
    expected = np.concatenate([np.log(1 + x / (1 + x.mean(1, keepdims=True))),
                               np.log(1 + y / (1 + y.mean(1, keepdims=True)))], axis=1)
    np.testing.assert_allclose(seen[0].numpy(), expected, rtol=1e-5)
    assert m.init_params["scale_encoder_input"] is True


def test_encoder_protein_dropout_hides_whole_cells_from_the_encoder_in_training(adata):
    """Training mode: exactly the cells of the mask drawn first are encoded with their proteins
    zeroed (RNA only); eval mode (every query and reported ELBO) sees all proteins."""
    m = TOTALVI(adata, encoder_protein_dropout=0.5, dropout_rate_encoder=0.0,
                empirical_protein_background_prior=False, **SMALL)
    assert m.init_params["encoder_protein_dropout"] == 0.5
    mod, mb = m.module, m.data.minibatch(np.arange(64))
    x, y, s = mb.x, mb.y, mb.s
    torch.manual_seed(0)
    keep = torch.rand(64, 1) >= 0.5
    assert 0 < keep.sum() < 64
    mod.train()
    torch.manual_seed(0)
    dropped = mod.encode(x, y, s)[0]
    mod.encoder_protein_dropout = 0.0
    expected = mod.encode(x, y * keep, s)[0]  # train-mode BatchNorm: same batch, same mask
    torch.testing.assert_close(dropped, expected)
    assert not torch.allclose(dropped, mod.encode(x, y, s)[0])
    mod.eval()
    plain = mod.encode(x, y, s)[0]
    mod.encoder_protein_dropout = 0.5
    torch.testing.assert_close(mod.encode(x, y, s)[0], plain)
    with pytest.raises(ValueError, match="encoder_protein_dropout"):
        TOTALVI(adata, encoder_protein_dropout=1.0, **SMALL)


@pytest.mark.slow
def test_benchmark_script_runs_our_side(tmp_path):
    """Keeps benchmarks/query_mapping.py in step with the API (2 epochs, our sides only)."""
    import json
    import subprocess
    import sys

    from .conftest import ROOT, shared_file

    shared_file("bmmc_cite_starter.h5ad")
    out = tmp_path / "q.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "query_mapping.py"), "--splits", "bmmc",
         "--sides", "ours", "ours_scaled", "--ref-epochs", "2", "--query-epochs", "2",
         "--out-json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())["bmmc"]
    assert set(res) == {"kNN on RNA PCs", "ours", "ours_scaled"}
    run = res["ours"]["0"]
    assert len(run["per_protein"]) == 134 and 0 <= run["label_agreement"] <= 1
    assert -1 <= run["median_corr"] <= 1
