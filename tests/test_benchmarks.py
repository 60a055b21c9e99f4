"""Smoke test of the benchmark script (our side only: scvi-tools is never installed here).

Speed is not asserted: the benchmark measures it; this only keeps the script in step with the
package's API, at the smallest size (1,000 + 100 held-out cells, 2 epochs).
"""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from pyro_totalvi import simulate

from .conftest import ROOT, benchmark_module, shared_file


@pytest.mark.slow
def test_compare_scvi_small_runs_our_side(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "compare_scvi.py"), "--small", "--sides",
         "ours", "--threads", "1", "--out-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    ours = res["results"]["ours"]
    assert res["data"]["n_cells"] == 1000 and res["data"]["n_heldout_cells"] == 100
    assert ours["train_cells_per_s"] > 0 and ours["inference_isolated"]
    terms = ("heldout_reconst_loss_gene", "heldout_reconst_loss_protein", "heldout_kl_div_z",
             "heldout_kl_div_back_pro")
    # the breakdown adds up to the held-out ELBO that get_elbo reports (same draws: same seed)
    assert math.isclose(sum(ours[t] for t in terms), ours["heldout_neg_elbo"], rel_tol=1e-4)
    for phase in ("latent", "normexpr", "de"):
        assert ours[f"{phase}_s"] > 0 and ours[f"{phase}_peak_rss_mb"] > 0
    assert "-ELBO/cell, held-out cells" in proc.stdout


@pytest.mark.slow
def test_background_small_runs_our_side(tmp_path):
    """benchmarks/background.py in smoke mode: one simulated setting (and the ECCITE-seq file
    when ../shared/data has it), a few epochs, our side only."""
    out = tmp_path / "background.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "background.py"), "--small", "--no-scvi",
         "--out-json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    (sim,) = res["sim"]
    assert set(sim["auc"]) == {"Bayes oracle", "log-ratio baseline", "before", "plain", "isotypes",
                               "isotypes + droplets"}
    assert all(0.0 <= v <= 1.0 for v in sim["auc"].values())
    assert all(math.isfinite(v) for v in sim["protein_elbo"].values())
    assert "ROC AUC of the foreground probability" in proc.stdout


def test_bayes_oracle_is_calibrated_and_ranks_at_least_as_well_as_the_baseline():
    """background.py's oracle is the posterior under the simulator's true parameters: among the
    cells it gives probability p, a fraction p is foreground (binned, within 3 binomial SDs),
    and it ranks no worse than the log-ratio baseline. A wrong component, prior or shift in it
    breaks the calibration."""
    bg = benchmark_module("background")
    adata, _ = simulate(**dict(bg.SIM_COMMON, n_cells=1000, n_genes=50),
                        **bg.SIM_SETTINGS["50% positive, weak"])
    T = bg.SIM_COMMON["n_proteins"]
    truth = (1 - adata.obsm["true_v"][:, :T]).ravel()
    post = bg.bayes_oracle(adata, T).ravel()
    bins = np.digitize(post, [0.1, 0.5, 0.9])
    for k in range(4):
        cells = bins == k
        assert cells.sum() >= 300
        p = post[cells].mean()
        assert abs(truth[cells].mean() - p) < 3 * np.sqrt(p * (1 - p) / cells.sum()), k
    baseline = bg.log_ratio_baseline(adata.obsm["protein_expression"].to_numpy()[:, :T],
                                     adata.obs["batch"].to_numpy())
    assert bg.auc(truth, post) > bg.auc(truth, baseline.ravel()) + 0.05


@pytest.mark.slow
def test_labels_benchmark_runs_our_side(tmp_path):
    """benchmarks/labels.py on 200 BMMC cells, 2 epochs, without scvi-tools: every method of
    ours reports scores in [0, 1] for the hidden donor."""
    shared_file("bmmc_cite_starter.h5ad")
    out = tmp_path / "labels.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "labels.py"), "--epochs", "2", "--seeds", "0",
         "--hidden", "s1d2", "--methods", "ours,knn,ours_pretrained", "--n-cells", "200",
         "--out-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == {"ours", "knn", "ours_pretrained"}
    assert all(0 <= r["accuracy"] <= 1 and 0 <= r["balanced_accuracy"] <= 1 for r in rows)
    assert "mean over donors and seeds" in proc.stdout


def test_background_start_sets_the_true_prior_and_nothing_else():
    """background_start.py's starts: "true-c" copies the simulator's c and leaves d as the
    default start made it; "true-d" the reverse; "default" changes nothing; "isotype-level"
    sets every non-isotype protein's c to the isotypes' mean log1p count of its batch."""
    import torch

    from pyro_totalvi import TOTALVI

    bs = benchmark_module("background_start")
    adata, _ = simulate(**dict(bs.bg.SIM_COMMON, n_cells=200, n_genes=30),
                        **bs.bg.SIM_SETTINGS["95% positive, strong"])
    TOTALVI.setup_anndata(adata, batch_key="batch")
    prior = adata.uns["true_protein_prior"]
    true_c, true_d = np.asarray(prior["c"]), np.asarray(prior["d"])
    for start in ("default", "true-c", "true-d", "true-cd"):
        module = TOTALVI(adata, n_latent=4, n_hidden=16).module
        c0, log_d0 = module.background_c.detach().clone(), module.background_log_d.detach().clone()
        bs.set_start(module, adata, start)
        c, d = module.background_c.detach(), module.background_log_d.detach().exp()
        assert torch.equal(c, torch.as_tensor(true_c, dtype=torch.float32) if "c" in start[5:]
                           else c0), start
        np.testing.assert_allclose(d, true_d if "d" in start[5:] else log_d0.exp(), rtol=1e-6)
    assert not np.allclose(c0, true_c)  # the default start is not the truth: the test can fail
    bs.set_start(module, adata, "isotype-level")
    c, n_iso = module.background_c.detach().numpy(), len(adata.uns["isotype_controls"])
    isotypes = np.log1p(adata.obsm["protein_expression"].to_numpy()[:, -n_iso:])
    batch = adata.obs["batch"].cat.codes.to_numpy()
    expected = [isotypes[batch == k].mean() for k in range(2)]
    np.testing.assert_allclose(c[:-n_iso], np.tile(expected, (len(c) - n_iso, 1)), rtol=1e-5)
    np.testing.assert_allclose(c[-n_iso:], true_c[-n_iso:], rtol=1e-6)  # untouched (true-cd)
    with pytest.raises(ValueError, match="start must be one of"):
        bs.set_start(module, adata, "true-z")


@pytest.mark.slow
def test_background_start_small_runs(tmp_path):
    out = tmp_path / "start.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "background_start.py"), "--small",
         "--setting", "50% positive, strong", "--start", "true-cd", "--isotypes",
         "--module", '{"background_cell_scale": false}', "--out-json", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = json.loads(out.read_text())
    assert run["start"] == "true-cd" and len(run["proteins"]) == 15 + 3  # isotypes last
    assert run["isotypes_declared"] and run["module"] == {"background_cell_scale": False}
    assert run["protein_elbo_parts"]["shift"] == 0.0  # no shift: the option reached the model
    assert 0.0 <= run["auc"] <= 1.0 and math.isfinite(run["protein_elbo"])
    assert "held-out protein ELBO" in proc.stdout
