"""Training on simulated and real data, history, divergence, reproducibility, save/load."""

import copy
import json
import logging
import random

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

from pyro_totalvi import TOTALVI, TrainingDivergedError
from pyro_totalvi.__main__ import _select_genes

from .conftest import knn_accuracy, shared_file


def test_validation_elbo_falls_and_latent_separates_groups(trained):
    h = trained.history
    assert {"elbo_train", "elbo_validation", "reconstruction_loss_validation",
            "kl_local_validation", "kl_weight"} <= set(h.columns)
    assert h["elbo_validation"].iloc[-1] < 0.8 * h["elbo_validation"].iloc[0]
    assert np.isfinite(h.to_numpy(dtype=float)).all()
    latent = trained.get_latent_representation()
    assert latent.shape == (trained.adata.n_obs, 10)
    acc = knn_accuracy(latent, trained.adata.obs["group"].to_numpy())
    assert acc >= 0.9, acc


def test_latent_order_follows_indices(trained):
    idx = np.array([5, 1, 400, 3])
    full = trained.get_latent_representation()
    np.testing.assert_allclose(trained.get_latent_representation(indices=idx), full[idx],
                               atol=1e-5)
    sample = trained.get_latent_representation(indices=idx, give_mean=False)
    assert not np.allclose(sample, full[idx])


def test_same_seed_same_history(adata):
    runs = []
    for _ in range(2):
        m = TOTALVI(adata, n_latent=5, n_hidden=32)
        m.train(max_epochs=2, seed=7, progress_bar=False)
        runs.append((m.history, m.get_latent_representation()))
    np.testing.assert_array_equal(runs[0][0].to_numpy(), runs[1][0].to_numpy())
    np.testing.assert_array_equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("mixture", ["marginal", "enumerate"])
@pytest.mark.parametrize("observed", [True, False])
def test_all_variants_train(adata, mixture, observed):
    m = TOTALVI(adata, n_latent=5, n_hidden=32, protein_mixture=mixture,
                use_observed_lib_size=observed)
    m.train(max_epochs=3, seed=0, progress_bar=False)
    assert np.isfinite(m.history["elbo_validation"]).all()
    assert m.get_elbo() == pytest.approx(m.get_elbo(), rel=0.05)


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_and_keeps_last_good_parameters(adata):
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    m.train(max_epochs=1, seed=0, progress_bar=False)
    good = {k: v.clone() for k, v in m.module.state_dict().items()}

    def poison(grad):  # the first backward pass of the next run returns NaN gradients
        return torch.full_like(grad, float("nan"))

    handle = m.module.log_theta.register_hook(poison)
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 1"):
        m.train(max_epochs=2, seed=0, progress_bar=False)
    handle.remove()
    for k, v in m.module.state_dict().items():
        torch.testing.assert_close(v, good[k])


@pytest.mark.filterwarnings("ignore:Encountered NaN")
def test_divergence_stops_a_long_epoch_early(adata):
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    steps = []

    def poison(grad):
        steps.append(1)
        return torch.full_like(grad, float("nan"))

    m.module.log_theta.register_hook(poison)
    # batch_size 4: 135 steps per epoch; the check every 64 steps stops it at the 64th
    with pytest.raises(TrainingDivergedError, match="epoch 0, step 1 "):
        m.train(max_epochs=1, batch_size=4, seed=0, progress_bar=False)
    assert len(steps) == 64


def test_save_load_reproduces_latent(trained, tmp_path):
    trained.save(tmp_path / "m")
    with pytest.raises(FileExistsError):
        trained.save(tmp_path / "m")
    fresh = trained.adata.copy()
    del fresh.uns["_pyro_totalvi"]
    loaded = TOTALVI.load(tmp_path / "m", fresh)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  trained.get_latent_representation())
    assert loaded.history.shape == trained.history.shape


@pytest.mark.slow
def test_eccite_trains_50_epochs_without_nan():
    adata = _select_genes(ad.read_h5ad(shared_file("eccite_pbmc_500.h5ad")), 2000)
    TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression")
    m = TOTALVI(adata)
    m.train(max_epochs=50, seed=0, progress_bar=False)
    h = m.history
    assert len(h) == 50 and np.isfinite(h.to_numpy(dtype=float)).all()
    assert h["elbo_validation"].iloc[-1] < h["elbo_validation"].iloc[0]
    assert np.isfinite(m.get_latent_representation()).all()


def test_save_load_reproduces_every_query(trained, tmp_path):
    trained.save(tmp_path / "all")
    loaded = TOTALVI.load(tmp_path / "all", trained.adata.copy())
    idx = np.arange(40)
    calls = {
        "normalized": lambda m: m.get_normalized_expression(indices=idx, n_samples=3,
                                                            return_numpy=True),
        "foreground": lambda m: m.get_protein_foreground_probability(indices=idx, n_samples=2,
                                                                     return_numpy=True),
        "predictive": lambda m: tuple(m.posterior_predictive_sample(indices=idx).values()),
        "library": lambda m: m.get_latent_library_size(indices=idx),
        "background": lambda m: m.get_protein_background_mean(indices=idx),
        "elbo": lambda m: m.get_elbo(indices=idx),
        "de": lambda m: m.differential_expression(groupby="group", group1="group_0",
                                                  group2="group_1", n_samples=200),
    }
    for name, call in calls.items():
        torch.manual_seed(11)
        a = call(trained)
        torch.manual_seed(11)
        b = call(loaded)
        if isinstance(a, pd.DataFrame):  # protein raw_normalized_mean is NaN, as scvi-tools'
            pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
            continue
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=name)


def test_module_subclass_trains_saves_and_loads(adata, tmp_path):
    """A reader's model extension (an extra parameter) goes through train, save and load."""
    from pyro_totalvi import TotalVIModule

    class Extended(TotalVIModule):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.extra = torch.nn.Parameter(torch.zeros(3))

    m = TOTALVI(adata, n_latent=5, n_hidden=32, module_class=Extended)
    assert isinstance(m.module, Extended)
    m.train(max_epochs=1, progress_bar=False)
    m.save(tmp_path / "ext")
    with pytest.raises(RuntimeError, match="extra"):
        TOTALVI.load(tmp_path / "ext", adata.copy())  # the base class has no such parameter
    loaded = TOTALVI.load(tmp_path / "ext", adata.copy(), module_class=Extended)
    np.testing.assert_array_equal(loaded.get_latent_representation(), m.get_latent_representation())


def _global_rng_states():
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _assert_same_rng_states(a, b):
    assert torch.equal(a[0], b[0])
    assert a[1][0] == b[1][0] and np.array_equal(a[1][1], b[1][1]) and a[1][2:] == b[1][2:]
    assert a[2] == b[2]


def test_train_and_de_leave_the_global_generators_alone(adata):
    """Seeded work runs on its own streams: the caller's torch, numpy and random states are
    as before, and the result does not depend on them."""
    runs = []
    for user_seed in (1, 2):
        torch.manual_seed(user_seed)
        np.random.seed(user_seed)
        random.seed(user_seed)
        before = _global_rng_states()
        m = TOTALVI(adata, n_latent=5, n_hidden=32, seed=3)
        m.train(max_epochs=2, seed=7, progress_bar=False)
        _assert_same_rng_states(before, _global_rng_states())
        de = m.differential_expression(groupby="group", group1="group_0", n_samples=50,
                                       silent=True)
        _assert_same_rng_states(before, _global_rng_states())
        runs.append((m.history, de))
    pd.testing.assert_frame_equal(runs[0][0], runs[1][0], check_exact=True)
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1], check_exact=True)


def _warmup_warnings(adata, caplog, **train_kwargs) -> list[str]:
    """The KL warm-up warnings of one short training run."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        TOTALVI(adata, n_latent=5, n_hidden=32).train(seed=0, progress_bar=False, **train_kwargs)
    return [r.getMessage() for r in caplog.records
            if "KL warm-up" in r.getMessage() and r.levelno == logging.WARNING]


def test_warning_when_training_ends_during_the_kl_warmup(adata, caplog):
    (text,) = _warmup_warnings(adata, caplog, max_epochs=2)  # 2 x 3 steps of 450
    assert "KL weight 0.01 after 6 of n_steps_kl_warmup=450 steps" in text, text
    assert "at least 150 epochs" in text and "n_steps_kl_warmup=5 or fewer" in text
    assert not _warmup_warnings(adata, caplog, max_epochs=2, n_steps_kl_warmup=5)


def test_warning_names_the_epochs_of_an_epoch_wise_kl_warmup(adata, caplog):
    (text,) = _warmup_warnings(adata, caplog, max_epochs=3, n_epochs_kl_warmup=10)
    # epoch e (from 0) has weight e / 10 (epoch 0 borrows epoch 1's): 0.2 after 3 epochs
    assert "KL weight 0.20 after 3 of n_epochs_kl_warmup=10 epochs" in text, text
    assert "at least 11 epochs" in text and "n_epochs_kl_warmup=2 or fewer" in text
    assert not _warmup_warnings(adata, caplog, max_epochs=3, n_epochs_kl_warmup=2)


def test_load_leaves_the_users_registration_alone(trained, tmp_path):
    trained.save(tmp_path / "m")
    a = trained.adata.copy()
    TOTALVI.setup_anndata(a, batch_key="batch")
    registration = a.uns["_pyro_totalvi"]
    snapshot = copy.deepcopy(dict(registration))
    loaded = TOTALVI.load(tmp_path / "m", a)
    assert a.uns["_pyro_totalvi"] is registration
    assert json.dumps(dict(a.uns["_pyro_totalvi"]), sort_keys=True, default=str) == json.dumps(
        snapshot, sort_keys=True, default=str)
    np.testing.assert_array_equal(loaded.get_latent_representation(),
                                  trained.get_latent_representation())
