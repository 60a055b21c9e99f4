"""Checkpoints: atomic writes, exact resume after an interruption, refusal of mismatched runs."""

import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

import pyro_totalvi.train as train_mod
from pyro_totalvi import TOTALVI, TotalVIDataError
from pyro_totalvi.train import CHECKPOINT_NAME, load_checkpoint

N_EPOCHS = 4
KW = dict(seed=3, batch_size=128, progress_bar=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(adata, **kwargs):
    return TOTALVI(adata, **{"n_latent": 5, "n_hidden": 32, **kwargs})


def _assert_same_run(a: TOTALVI, b: TOTALVI) -> None:
    pd.testing.assert_frame_equal(a.history, b.history, check_exact=True)
    np.testing.assert_array_equal(a.history.to_numpy(), b.history.to_numpy())
    sa, sb = a.module.state_dict(), b.module.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    for k in ("train", "validation"):
        np.testing.assert_array_equal(a.split[k], b.split[k])
    np.testing.assert_array_equal(a.get_latent_representation(), b.get_latent_representation())


@pytest.fixture(scope="module")
def reference(sim_adata):
    """Uninterrupted N-epoch runs, one per model variant."""
    cache = {}

    def get(adata, **model_kwargs):
        key = tuple(sorted(model_kwargs.items()))
        if key not in cache:
            cache[key] = _model(adata, **model_kwargs).train(max_epochs=N_EPOCHS, **KW)
        return cache[key]

    return get


@pytest.mark.parametrize("model_kwargs", [{}, {"use_observed_lib_size": False}])
def test_resume_after_stop_equals_uninterrupted(adata, tmp_path, reference, model_kwargs):
    k = 2
    first = _model(adata, **model_kwargs)
    first.train(max_epochs=k, checkpoint_every=k, checkpoint_dir=tmp_path, **KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]  # no temp files
    state = load_checkpoint(tmp_path)
    assert state["epoch"] == k and len(state["history"]) == k
    # Another process: fresh model, global RNGs elsewhere.
    torch.manual_seed(12345)
    np.random.seed(54321)
    resumed = _model(adata, **model_kwargs)
    resumed.train(max_epochs=N_EPOCHS, checkpoint_dir=tmp_path, resume=True, **KW)
    _assert_same_run(resumed, reference(adata, **model_kwargs))
    assert load_checkpoint(tmp_path)["epoch"] == N_EPOCHS  # the end of the run is checkpointed
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


def test_resume_after_interrupt_mid_epoch_equals_uninterrupted(adata, tmp_path, reference,
                                                              monkeypatch):
    calls = {"n": 0}
    real_evaluate = train_mod.evaluate

    def interrupt_in_epoch_3(*args, **kwargs):  # 2 evaluations per epoch; epoch 3 is index 2
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(train_mod, "evaluate", interrupt_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        _model(adata).train(max_epochs=N_EPOCHS, checkpoint_every=2, checkpoint_dir=tmp_path,
                            **KW)
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert load_checkpoint(tmp_path)["epoch"] == 2
    resumed = _model(adata).train(max_epochs=N_EPOCHS, checkpoint_every=2,
                                  checkpoint_dir=tmp_path, resume=True, **KW)
    _assert_same_run(resumed, reference(adata))


def test_failed_write_keeps_previous_checkpoint_and_no_temp_file(adata, tmp_path, monkeypatch):
    m = _model(adata)
    m.train(max_epochs=1, checkpoint_dir=tmp_path, **KW)
    before = (tmp_path / CHECKPOINT_NAME).read_bytes()
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        _model(adata).train(max_epochs=2, checkpoint_dir=tmp_path, **KW)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == before


def test_resume_refuses_missing_or_mismatched_checkpoint(adata, tmp_path):
    def make(data, **kwargs):  # no empirical background prior: 9 models, 1 s of fitting each
        return _model(data, empirical_protein_background_prior=False, **kwargs)

    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        make(adata).train(max_epochs=2, checkpoint_dir=tmp_path, resume=True, **KW)
    with pytest.raises(ValueError, match="checkpoint_dir"):
        make(adata).train(max_epochs=2, resume=True, **KW)
    make(adata).train(max_epochs=1, checkpoint_dir=tmp_path, **KW)

    def resume(data, model_kwargs=None, **kwargs):
        make(data, **(model_kwargs or {})).train(
            max_epochs=2, checkpoint_dir=tmp_path, resume=True, **{**KW, **kwargs})

    fewer = adata[:500].copy()
    TOTALVI.setup_anndata(fewer, batch_key="batch")
    with pytest.raises(TotalVIDataError, match="600 cells.*this data has 500"):
        resume(fewer)
    other = adata.copy()
    other.obsm["protein_expression"].iloc[0, 0] += 1
    TOTALVI.setup_anndata(other, batch_key="batch")
    with pytest.raises(TotalVIDataError, match="other data of the same shape"):
        resume(other)
    masked = adata.copy()  # same counts, but a protein declared missing in one batch
    proteins = masked.obsm["protein_expression"].columns
    measured = pd.DataFrame(True, index=["batch_0", "batch_1"], columns=proteins)
    measured.iloc[1, 0] = False
    TOTALVI.setup_anndata(masked, batch_key="batch", protein_mask=measured)
    with pytest.raises(TotalVIDataError, match="other data of the same shape"):
        resume(masked)
    with pytest.raises(ValueError, match="lr=0.004 there, 0.001 here"):
        resume(adata, lr=1e-3)
    with pytest.raises(ValueError, match="seed=3 there, 4 here"):
        resume(adata, seed=4)
    with pytest.raises(ValueError, match="different model.*shapes differ"):
        resume(adata, {"n_hidden": 16})
    with pytest.raises(ValueError, match="protein_mixture='marginal' there, 'enumerate' here"):
        resume(adata, {"protein_mixture": "enumerate"})
    # nothing was overwritten by the refused attempts
    assert load_checkpoint(tmp_path)["epoch"] == 1


def test_different_seeds_give_different_results(adata):
    """Complements test_train.py::test_same_seed_same_history: the seeds are really used."""
    runs = {}
    for init_seed, train_seed in [(0, 7), (0, 8), (1, 7)]:
        m = _model(adata, seed=init_seed)
        m.train(max_epochs=2, **{**KW, "seed": train_seed})
        runs[init_seed, train_seed] = m
    for a, b in [((0, 7), (0, 8)), ((0, 7), (1, 7))]:
        ha, hb = runs[a].history, runs[b].history
        assert not np.array_equal(ha["elbo_train"].to_numpy(), hb["elbo_train"].to_numpy())
        assert not np.allclose(runs[a].get_latent_representation(),
                               runs[b].get_latent_representation())
    # the train seed also draws the train/validation split
    assert not np.array_equal(runs[0, 7].split["validation"], runs[0, 8].split["validation"])
    init = [_model(adata, seed=s).module.state_dict()["log_theta"] for s in (0, 1)]
    assert not torch.equal(*init)


def test_save_overwrite_leaves_no_stale_history_or_temp_files(adata, tmp_path):
    trained = _model(adata).train(max_epochs=1, **KW)
    trained.save(tmp_path / "m")
    _model(adata).save(tmp_path / "m", overwrite=True)  # untrained: no history
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["params.pt", "settings.json"]
    assert TOTALVI.load(tmp_path / "m", adata).history is None


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_written_files_get_the_mode_the_umask_gives(adata, tmp_path, umask, mode):
    """As open() would make them (a private temporary file is renamed into place)."""
    before = os.umask(umask)
    try:
        m = _model(adata).train(max_epochs=1, checkpoint_dir=tmp_path / "ckpt", **KW)
        m.save(tmp_path / "model")
    finally:
        os.umask(before)
    files = [tmp_path / "ckpt" / CHECKPOINT_NAME] + sorted((tmp_path / "model").iterdir())
    assert {p.name for p in files} >= {CHECKPOINT_NAME, "settings.json", "params.pt"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == mode, path
