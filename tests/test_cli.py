"""The main job: python -m pyro_totalvi train --demo / INPUT.h5ad."""

import anndata as ad
import pandas as pd

from pyro_totalvi.__main__ import main


def test_demo_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["train", "--demo", "--n-cells", "300", "--max-epochs", "3", "--out", str(out)]) == 0
    a = ad.read_h5ad(out / "adata_totalvi.h5ad")
    assert a.obsm["X_totalvi"].shape == (300, 20)
    h = pd.read_csv(out / "history.csv")
    assert len(h) == 3 and "elbo_validation" in h
    assert (out / "elbo.png").stat().st_size > 1000
    assert "training cells/s" in capsys.readouterr().out


def test_train_on_h5ad_with_gene_selection(tmp_path, sim_adata):
    path = tmp_path / "in.h5ad"
    sim_adata[:200].copy().write_h5ad(path)
    out = tmp_path / "o"
    main(["train", str(path), "--out", str(out), "--n-genes", "50", "--max-epochs", "2",
          "--batch-key", "batch", "--protein-mixture", "enumerate"])
    a = ad.read_h5ad(out / "adata_totalvi.h5ad")
    assert a.n_vars == 50 and a.obsm["X_totalvi"].shape == (200, 20)
