"""Where the model runs: ``accelerator``/``device`` (CPU always; GPU tests skip without CUDA)."""

import numpy as np
import pandas as pd
import pyro
import pytest
import torch
from pyro.infer import Predictive

from pyro_totalvi import TOTALVI
from pyro_totalvi.train import load_checkpoint, resolve_device

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)")


def test_resolve_device_names():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto", "cpu") == torch.device("cpu")
    assert resolve_device("auto", torch.device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device().type == expected
    with pytest.raises(ValueError, match="accelerator must be"):
        resolve_device("tpu")
    with pytest.raises(ValueError, match="does not match accelerator='cpu'"):
        resolve_device("cpu", "cuda:0")


def test_auto_keeps_torchrun_processes_on_cpu_without_a_gpu_each(monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(torch.cuda.device_count() + 1))
    assert resolve_device("auto") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
@pytest.mark.parametrize("accelerator, device", [("gpu", "auto"), ("cuda", 0), ("auto", "cuda:0")])
def test_gpu_request_without_cuda_says_so(accelerator, device):
    with pytest.raises(RuntimeError, match="needs a CUDA GPU.*accelerator='cpu'"):
        resolve_device(accelerator, device)


def test_train_on_cpu_explicitly(adata):
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    m.train(max_epochs=2, accelerator="cpu", progress_bar=False)
    assert m.device == torch.device("cpu")
    assert np.isfinite(m.history["elbo_validation"]).all()


# ----------------------------------------------------------------------------------------------
@cuda
def test_every_query_runs_on_the_gpu(adata):
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    m.train(max_epochs=20, accelerator="gpu", progress_bar=False)
    assert m.device.type == "cuda"
    assert all(p.device.type == "cuda" for p in m.module.parameters())
    h = m.history["elbo_validation"]
    assert np.isfinite(h).all() and h.iloc[-1] < h.iloc[0]
    assert m.get_latent_representation().shape == (adata.n_obs, 5)
    rna, pro = m.get_normalized_expression(n_samples=3, transform_batch="batch_0")
    assert isinstance(rna, pd.DataFrame) and np.isfinite(rna.to_numpy()).all()
    assert np.isfinite(m.get_protein_foreground_probability(n_samples=2).to_numpy()).all()
    x = m.posterior_predictive_sample(n_samples=2)["rna"]
    assert x.shape == (adata.n_obs, adata.n_vars, 2) and (x >= 0).all()
    de = m.differential_expression(groupby="group", group1="group_0", n_samples=200)
    assert np.isfinite(de["lfc_mean"]).all()
    corr = m.get_feature_correlation_matrix(n_samples=2, correlation_type="pearson")
    assert np.allclose(np.diag(corr), 1, atol=1e-4)
    assert m.get_marginal_ll(n_mc_samples=5) >= m.get_elbo() - 5


@cuda
def test_gpu_and_cpu_give_the_same_posterior(adata, tmp_path):
    m = TOTALVI(adata, n_latent=5, n_hidden=32)
    m.train(max_epochs=5, accelerator="cpu", progress_bar=False)
    z_cpu = m.get_latent_representation()
    pyro.set_rng_seed(0)
    rna_cpu, pro_cpu = m.get_normalized_expression(n_samples=200, return_numpy=True)
    elbo_cpu = np.mean([m.get_elbo() for _ in range(5)])

    m.to_device("cuda")
    assert m.device.type == "cuda"
    np.testing.assert_allclose(m.get_latent_representation(), z_cpu, atol=1e-4)
    rna_gpu, pro_gpu = m.get_normalized_expression(n_samples=200, return_numpy=True)
    # Different generators draw different samples: compare per-gene means over cells.
    np.testing.assert_allclose(rna_gpu.mean(0), rna_cpu.mean(0), rtol=0.02, atol=1e-6)
    np.testing.assert_allclose(pro_gpu.mean(0), pro_cpu.mean(0), rtol=0.05)
    assert np.mean([m.get_elbo() for _ in range(5)]) == pytest.approx(elbo_cpu, rel=5e-3)

    # Saved from the GPU, loaded on the CPU (a machine without a GPU can read it).
    m.save(tmp_path / "m")
    loaded = TOTALVI.load(tmp_path / "m", adata.copy(), accelerator="cpu")
    assert loaded.device == torch.device("cpu")
    np.testing.assert_allclose(loaded.get_latent_representation(), z_cpu, atol=1e-4)


@cuda
def test_checkpoint_resume_on_gpu(adata, tmp_path):
    kw = dict(seed=0, progress_bar=False, accelerator="gpu", checkpoint_dir=tmp_path / "ck")
    TOTALVI(adata, n_latent=5, n_hidden=32).train(max_epochs=2, **kw)
    assert load_checkpoint(tmp_path / "ck")["epoch"] == 2
    resumed = TOTALVI(adata, n_latent=5, n_hidden=32).train(max_epochs=4, resume=True, **kw)
    whole = TOTALVI(adata, n_latent=5, n_hidden=32).train(
        max_epochs=4, seed=0, progress_bar=False, accelerator="gpu")
    assert resumed.device.type == "cuda" and len(resumed.history) == 4
    # GPU kernels may sum in another order from run to run: equal up to float rounding.
    np.testing.assert_allclose(resumed.history["elbo_validation"],
                               whole.history["elbo_validation"], rtol=1e-3)


@cuda
def test_prior_predictive_samples_on_the_gpu(adata):
    m = TOTALVI(adata, n_latent=5, n_hidden=32).to_device("cuda")
    mb = m.data.minibatch(np.arange(50), m.device)
    x, y, s, log_library, cov, mask = mb.args()
    draws = Predictive(m.module.model, num_samples=3, return_sites=["z", "x", "y"])(
        None, None, s, log_library, cov, mask)
    assert draws["x"].shape == (3, 50, adata.n_vars)
    assert all(v.device.type == "cuda" for v in draws.values())
