"""TOTALANVI: the label model's ELBO against a hand sum, label recovery, save/load,
``from_totalvi_model`` and bad input."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO

from pyro_totalvi import TOTALANVI, TOTALVI, TotalANVIModule, TotalVIDataError
from pyro_totalvi.data import REGISTRY_KEY, CiteData
from pyro_totalvi.scoring import elbo_terms, score_minibatch

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny networks: threads only spin


def _with_labels(sim_adata, fraction_hidden=0.5, seed=0):
    """A copy with ``obs["cell_type"]`` = the simulated group, "Unknown" for a random part."""
    a = sim_adata.copy()
    hidden = np.random.default_rng(seed).random(a.n_obs) < fraction_hidden
    a.obs["cell_type"] = a.obs["group"].astype(str).to_numpy()
    a.obs.loc[hidden, "cell_type"] = "Unknown"
    return a, hidden


@pytest.fixture
def labelled(sim_adata):
    a, hidden = _with_labels(sim_adata)
    TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="cell_type",
                            unlabeled_category="Unknown")
    return a, hidden


def _module(data, n_labels, **kw):
    torch.manual_seed(0)
    m = TotalANVIModule(data.n_genes, data.n_proteins, data.n_batches, n_latent=3, n_hidden=16,
                        n_labels=n_labels, background_preference=0.0, **kw).eval()
    with torch.no_grad():  # distinct Gaussians per label, so the label matters
        m.label_locs.normal_()
        m.label_log_scales.uniform_(-0.5, 0.5)
    return m


def _diag_kl(mq, sq, mp, sp):
    """KL(N(mq, sq^2) || N(mp, sp^2)) summed over the last dimension, written out."""
    return 0.5 * (2 * torch.log(sp / sq) + (sq ** 2 + (mq - mp) ** 2) / sp ** 2 - 1).sum(-1)


@pytest.mark.parametrize("mixture", ["marginal", "enumerate"])
@pytest.mark.parametrize("fraction_hidden", [0.0, 0.5, 1.0])
def test_enumerated_and_observed_labels_give_the_hand_summed_elbo(sim_adata, mixture,
                                                                  fraction_hidden):
    """TraceEnum_ELBO (label enumerated in the guide, observed through obs_mask; v enumerated
    or not) equals, draw for draw, the ELBO summed by hand: for a labelled cell
    log p(c*) + log p(z | c*), for an unlabelled one sum_k q(k) [log p(k) + log p(z | k) -
    log q(k)]; and the scorer's analytic terms equal the same with closed-form KLs."""
    a, _ = _with_labels(sim_adata, 0.0)
    TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="cell_type")
    data = CiteData(a, extras=("labels",))
    m = _module(data, 4, protein_mixture=mixture)
    mb = data.minibatch(np.arange(40))
    hidden = torch.from_numpy(np.random.default_rng(1).random(40) < fraction_hidden)
    labels = mb.extras["labels"] = torch.where(hidden, -1, mb.extras["labels"])
    known = labels >= 0
    assert known.any() == (fraction_hidden < 1) and (~known).any() == (fraction_hidden > 0)
    pyro.set_rng_seed(3)
    loss = TraceEnum_ELBO(max_plate_nesting=2).loss(m.model, m.guide, *mb.args(), **mb.kwargs())

    pyro.set_rng_seed(3)  # the same draws of z and beta (c is drawn last, after them)
    with m.v_summed_out():
        guide_tr = poutine.trace(m.guide).get_trace(*mb.args(), **mb.kwargs())
        model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(
            *mb.args(), **mb.kwargs())
    q_z = guide_tr.nodes["z"]["fn"]
    z = guide_tr.nodes["z"]["value"].squeeze(-2)
    z_loc, z_scale = q_z.base_dist.loc.squeeze(-2), q_z.base_dist.scale.squeeze(-2)
    log_qc = m.classify(z_loc).log_softmax(-1)
    log_pc = -math.log(4)
    locs, scales = m.label_locs, m.label_log_scales.exp()
    log_pz = dist.Normal(locs, scales).log_prob(z.unsqueeze(1)).sum(-1)  # (B, K)
    code = labels.clamp_min(0).unsqueeze(-1)
    q = log_qc.exp()
    label_part = torch.where(known, log_pc + log_pz.gather(1, code).squeeze(1),
                             (q * (log_pc + log_pz - log_qc)).sum(-1))
    rest = sum(model_tr.nodes[s]["fn"].log_prob(model_tr.nodes[s]["value"]).sum((-2, -1))
               for s in ("x", "y"))
    for site in ("beta", "background_scale"):  # the other latent sites, log p - log q
        if site in guide_tr.nodes:
            value = model_tr.nodes[site]["value"]
            rest = rest + (model_tr.nodes[site]["fn"].log_prob(value)
                           - guide_tr.nodes[site]["fn"].log_prob(value)).sum()
    hand = (label_part - q_z.log_prob(z.unsqueeze(-2)).squeeze(-1)).sum() + rest
    assert loss == pytest.approx(-hand.item(), rel=1e-5)

    terms, observed = score_minibatch(m, mb, 40)
    assert "c_observed" in observed and "c_unobserved" not in observed
    kl = _diag_kl(z_loc.unsqueeze(1), z_scale.unsqueeze(1), locs, scales)  # (B, K)
    expected = torch.where(known, log_pc - kl.gather(1, code).squeeze(1),
                           (q * (log_pc - kl - log_qc)).sum(-1))
    got = terms["c_observed"] + terms["c_unobserved"] + terms["z"]
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("warmup", [False, True])
def test_latent_terms_are_warmed_up_only_when_asked(labelled, warmup):
    """As scvi-tools' TOTALANVI (default): the KL warm-up factor scales the background terms
    and the guide's label site, not p(c) p(z | c) and q(z); with ``latent_kl_warmup`` it scales
    them too. The scale each site enters the ELBO with, in model and guide."""
    a, _ = labelled
    data = CiteData(a, extras=("labels",))
    m = _module(data, 4, latent_kl_warmup=warmup)
    mb = data.minibatch(np.arange(32))
    kw = dict(mb.kwargs(), kl_weight=0.3)
    guide_tr = poutine.trace(m.guide).get_trace(*mb.args(), **kw)
    model_tr = poutine.trace(poutine.replay(m.model, trace=guide_tr)).get_trace(*mb.args(), **kw)
    latent = 0.3 if warmup else 1.0
    assert guide_tr.nodes["z"]["scale"] == model_tr.nodes["z"]["scale"] == latent
    assert model_tr.nodes["c_observed"]["scale"] == latent
    assert guide_tr.nodes["c_unobserved"]["scale"] == 0.3
    assert guide_tr.nodes["beta"]["scale"] == model_tr.nodes["beta"]["scale"] == 0.3


def test_classification_factor_trains_but_is_never_reported(labelled):
    a, _ = labelled
    data = CiteData(a, extras=("labels",))
    m = _module(data, 4)
    mb = data.minibatch(np.arange(64))
    out = []
    for weight in (0.0, 5.0):
        m.classification_weight = weight
        pyro.set_rng_seed(0)
        loss = TraceEnum_ELBO(max_plate_nesting=2).loss(m.model, m.guide, *mb.args(),
                                                        **mb.kwargs())
        out.append((loss, elbo_terms(m, data, np.arange(100))))
    (loss0, terms0), (loss5, terms5) = out
    assert terms0 == terms5
    # the factor is w * log q(c* | x, y) per labelled cell: it lowers the loss by -w * sum(...)
    with torch.no_grad():
        log_q = m.classify(m.encode(*mb.args())[0]).log_softmax(-1)
    labels = mb.extras["labels"]
    ce = -log_q[labels >= 0].gather(1, labels[labels >= 0].unsqueeze(1)).sum().item()
    assert loss5 - loss0 == pytest.approx(5.0 * ce, rel=1e-4)


@pytest.mark.slow
def test_predict_recovers_hidden_labels(labelled):
    a, hidden = labelled
    model = TOTALANVI(a, n_latent=10)
    model.train(max_epochs=25, seed=0, progress_bar=False)
    truth = a.obs["group"].astype(str).to_numpy()
    pred = model.predict()
    accuracy = (pred[hidden] == truth[hidden]).mean()
    assert accuracy >= 0.9, accuracy
    soft = model.predict(soft=True, indices=np.flatnonzero(hidden))
    assert list(soft.columns) == ["group_0", "group_1", "group_2", "group_3"]
    np.testing.assert_allclose(soft.to_numpy().sum(1), 1.0, rtol=1e-5)
    assert (soft.idxmax(axis=1).to_numpy() == pred[hidden]).all()


@pytest.fixture(scope="module")
def small(sim_adata):
    """A TOTALANVI trained for two epochs on 200 cells (queries and save/load need no more)."""
    a, _ = _with_labels(sim_adata[:200])
    TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="cell_type",
                            unlabeled_category="Unknown")
    model = TOTALANVI(a, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, seed=0, progress_bar=False)
    return model


def test_totalvi_queries_work_through_the_mixins(small):
    rna, pro = small.get_normalized_expression(n_samples=2)
    assert rna.shape == (200, small.data.n_genes) and np.isfinite(pro.to_numpy()).all()
    de = small.differential_expression(groupby="cell_type", group1="group_0", group2="group_1",
                                       n_samples=50)
    assert len(de) == small.data.n_genes + small.data.n_proteins
    assert np.isfinite(small.get_elbo()) and np.isfinite(small.get_marginal_ll(
        indices=np.arange(20), n_mc_samples=3))
    assert np.isfinite(small.history["elbo_validation"]).all()
    assert small.get_latent_representation().shape == (200, 4)


def test_save_and_load(small, tmp_path):
    small.save(tmp_path / "m")
    adata = small.adata.copy()
    del adata.uns[REGISTRY_KEY]
    loaded = TOTALANVI.load(tmp_path / "m", adata)
    assert isinstance(loaded.module, TotalANVIModule) and loaded._label_mapping == \
        small._label_mapping
    for key, value in small.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value), key
    np.testing.assert_array_equal(loaded.predict(), small.predict())
    pd_soft = loaded.predict(soft=True)
    np.testing.assert_allclose(pd_soft.to_numpy(), small.predict(soft=True).to_numpy())
    # a query without the labels column: every cell unlabelled, predictions unchanged
    query = small.adata.copy()
    del query.obs["cell_type"]
    np.testing.assert_array_equal(loaded.predict(query), small.predict())
    with pytest.raises(ValueError, match="holds a TOTALANVI model; load it with TOTALANVI"):
        TOTALVI.load(tmp_path / "m", adata)


def test_from_totalvi_model_starts_from_its_weights(sim_adata):
    a = sim_adata[:200].copy()
    TOTALVI.setup_anndata(a, batch_key="batch")
    totalvi = TOTALVI(a, n_latent=4, n_hidden=32)
    totalvi.train(max_epochs=2, seed=0, progress_bar=False)
    a.obs["cell_type"] = np.where(np.arange(200) % 2, a.obs["group"].astype(str), "Unknown")
    with pytest.raises(ValueError, match="labels_key is needed"):
        TOTALANVI.from_totalvi_model(totalvi, "Unknown")
    with pytest.warns(UserWarning, match="ignoring n_latent"):
        anvi = TOTALANVI.from_totalvi_model(totalvi, "Unknown", labels_key="cell_type",
                                            n_latent=7, linear_classifier=True)
    base = totalvi.module.state_dict()
    state = anvi.module.state_dict()
    for key, value in base.items():
        assert torch.equal(state[key], value), key
    assert set(state) - set(base) >= {"label_locs", "label_log_scales", "classifier.weight"}
    assert anvi.module.n_latent == 4 and isinstance(anvi.module.classifier, torch.nn.Linear)
    assert not anvi.module.background_c.requires_grad
    # the same model: p(z | c) = N(0, I) for every c, so the x, y, z, beta terms are TOTALVI's
    idx = np.arange(100)
    pyro.set_rng_seed(0)
    ours = elbo_terms(anvi.module, anvi.data, idx)
    pyro.set_rng_seed(0)
    theirs = elbo_terms(totalvi.module, totalvi.data, idx)
    for name in ("x", "y", "z", "beta"):
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5), name
    labelled = (anvi.data.extras["labels"][idx] >= 0).mean()
    assert ours["c_observed"] == pytest.approx(labelled * math.log(4), rel=1e-5)
    assert totalvi.registry.get("extras") is None  # the TOTALVI's own registry is unchanged
    anvi.train(seed=0, progress_bar=False, max_epochs=1)
    assert anvi.history.shape[0] == 1
    assert anvi.history["kl_weight"].iloc[-1] == 1 / 400  # the warm-up restarts, as scvi-tools


def test_bad_labels_input(sim_adata):
    a, _ = _with_labels(sim_adata[:120])
    with pytest.raises(ValueError, match="labels_key"):
        TOTALANVI.setup_anndata(a, batch_key="batch")
    with pytest.raises(KeyError, match="nope"):
        TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="nope")
    assert REGISTRY_KEY not in a.uns  # nothing written when the labels are bad
    TOTALVI.setup_anndata(a, batch_key="batch")
    with pytest.raises(TotalVIDataError, match="no labels registered"):
        TOTALANVI(a)
    # unlabeled_category absent from the column: every cell labelled
    TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="group", unlabeled_category="?")
    model = TOTALANVI(a, n_latent=3, n_hidden=16)
    assert (model.data.extras["labels"] >= 0).all() and model.module.n_labels == 4
    assert TOTALVI(a, n_latent=3, n_hidden=16).data.extras == {}  # TOTALVI ignores the labels
    # unknown categories at query time
    query = a.copy()
    query.obs["group"] = query.obs["group"].astype(str)
    query.obs.loc[query.obs_names[:3], "group"] = "group_9"
    with pytest.raises(TotalVIDataError, match="group_9"):
        model.predict(query)
    # one label only: a warning, and predict returns it
    a.obs["one"] = "T cell"
    a.obs.loc[a.obs_names[::2], "one"] = "Unknown"
    with pytest.warns(UserWarning, match="one label only"):
        TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="one",
                                unlabeled_category="Unknown")
    one = TOTALANVI(a, n_latent=3, n_hidden=16)
    one.train(max_epochs=1, progress_bar=False)
    assert set(one.predict()) == {"T cell"}
    # nothing but the unlabeled category
    a.obs["none"] = "Unknown"
    with pytest.raises(TotalVIDataError, match="no category besides"):
        TOTALANVI.setup_anndata(a, labels_key="none", unlabeled_category="Unknown")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(NotImplementedError):
            TOTALANVI.setup_mudata(None)


def test_query_mapping_keeps_the_reference_and_predicts(sim_adata):
    """prepare_query_anndata / load_query_data work for TOTALANVI as for TOTALVI (the same code
    path): the query model is a TOTALANVI, the classifier and the label Gaussians stay bit for
    bit the reference's (freeze_classifier), and predict() labels the new batch's cells with
    the reference's categories; an unknown label in the query raises naming it."""
    a, _ = _with_labels(sim_adata, 0.0)
    a.obs["batch"] = a.obs["batch"].astype(str)
    is_query = a.obs["batch"].to_numpy() == a.obs["batch"].iloc[0]
    ref, query = a[~is_query].copy(), a[is_query].copy()
    query.obs["batch"] = "new_batch"
    query.obs["cell_type"] = "Unknown"
    TOTALANVI.setup_anndata(ref, batch_key="batch", labels_key="cell_type",
                            unlabeled_category="Unknown")
    model = TOTALANVI(ref, n_latent=4, n_hidden=32).train(max_epochs=30, seed=0,
                                                          progress_bar=False)
    before = {k: v.clone() for k, v in model.module.state_dict().items()
              if k.startswith(("classifier", "label_"))}
    TOTALANVI.prepare_query_anndata(query, model)
    mapped = TOTALANVI.load_query_data(query, model)
    assert isinstance(mapped, TOTALANVI)
    mapped.train(max_epochs=5, seed=0, progress_bar=False, plan_kwargs=dict(weight_decay=0.0))
    after = mapped.module.state_dict()
    assert all(torch.equal(before[k], after[k].cpu()) for k in before)
    pred = mapped.predict()
    assert len(pred) == query.n_obs and set(pred) <= set(ref.obs["cell_type"])
    truth = query.obs["group"].astype(str).to_numpy()
    assert (pred == truth).mean() > 1.5 / len(set(truth))  # well above chance

    bad = a[is_query].copy()
    bad.obs["batch"] = "new_batch"
    bad.obs["cell_type"] = np.where(np.arange(bad.n_obs) % 2, "Unknown", "a_new_type")
    TOTALANVI.prepare_query_anndata(bad, model)
    with pytest.raises(TotalVIDataError, match="a_new_type"):
        TOTALANVI.load_query_data(bad, model)


def test_training_defaults_are_scvi_tools_totalanvi(sim_adata):
    """lr 1e-3, a 400-epoch KL warm-up, minibatches of 128, no LR schedule (scvi-tools 1.4.2's
    TOTALANVI plan), and plan_kwargs still override them."""
    a, _ = _with_labels(sim_adata[:300])
    TOTALANVI.setup_anndata(a, batch_key="batch", labels_key="cell_type",
                            unlabeled_category="Unknown")
    model = TOTALANVI(a, n_latent=4, n_hidden=32)
    model.train(max_epochs=2, seed=0, progress_bar=False)
    assert model.history["kl_weight"].tolist() == pytest.approx([1 / 400, 1 / 400])  # epoch 0, 1
    assert model.history["lr"].iloc[-1] == pytest.approx(1e-3)
    model.train(max_epochs=1, seed=0, progress_bar=False, plan_kwargs=dict(lr=5e-4),
                n_epochs_kl_warmup=None, n_steps_kl_warmup=0)
    assert model.history["lr"].iloc[-1] == pytest.approx(5e-4)
    assert model.history["kl_weight"].iloc[-1] == 1.0
