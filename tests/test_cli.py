"""The main job: python -m pyro_totalvi train --demo / INPUT.h5ad."""

import logging
import subprocess
import sys
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pandas as pd
import pytest

from pyro_totalvi.__main__ import CommandLineError, _report_training, build_parser, main

from .conftest import ROOT


def test_demo_writes_results(tmp_path, capsys):
    out = tmp_path / "results"
    assert main(["train", "--demo", "--n-cells", "300", "--max-epochs", "3", "--out", str(out)]) == 0
    a = ad.read_h5ad(out / "adata_totalvi.h5ad")
    assert a.obsm["X_totalvi"].shape == (300, 20)
    h = pd.read_csv(out / "history.csv")
    assert len(h) == 3 and "elbo_validation" in h
    assert (out / "elbo.png").stat().st_size > 1000
    assert "training cells/s" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# A user's mistakes: one line naming the problem and what to do, exit status 2


def _fails_with(argv, capsys, *fragments):
    """``main(argv)`` returns 2 and prints exactly one line (to stderr) holding ``fragments``."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in err, err
    return err


@pytest.fixture
def h5ad(tmp_path, sim_adata):
    path = tmp_path / "in.h5ad"
    sim_adata[:100].copy().write_h5ad(path)
    return path


def test_missing_input_file(tmp_path, capsys):
    _fails_with(["train", str(tmp_path / "nope.h5ad")], capsys, "nope.h5ad", "no such file",
                "--demo")


def test_input_that_is_not_h5ad(tmp_path, capsys):
    path = tmp_path / "counts.csv"
    path.write_text("cell,CD3\nc1,4\n")
    _fails_with(["train", str(path)], capsys, "counts.csv", "cannot be read as an .h5ad",
                "write_h5ad")


def test_input_that_is_a_directory(tmp_path, capsys):
    _fails_with(["train", str(tmp_path)], capsys, "is a directory")


@pytest.mark.parametrize("option, where", [("--protein-key", "obsm"), ("--batch-key", "obs"),
                                           ("--layer", "layers")])
def test_wrong_key(h5ad, capsys, option, where):
    err = _fails_with(["train", str(h5ad), option, "nope"], capsys, f"{option} 'nope'",
                      f"file's {where}", "pass one of those")
    if option == "--protein-key":
        assert "protein_expression" in err  # the keys it has are listed


def test_out_is_an_existing_file(h5ad, tmp_path, capsys):
    out = tmp_path / "taken"
    out.write_text("")
    _fails_with(["train", str(h5ad), "--out", str(out)], capsys, "--out", "existing file",
                "directory")


def test_bad_counts_found_by_setup(tmp_path, sim_adata, capsys):
    a = sim_adata[:100].copy()
    x = a.X.toarray().astype(np.float32)
    x[3, 5] = -1
    a.X = x
    path = tmp_path / "neg.h5ad"
    a.write_h5ad(path)
    _fails_with(["train", str(path), "--batch-key", "batch"], capsys,
                "the data cannot be used", "negative")


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(CommandLineError, match="no such file"):
        main(["train", str(tmp_path / "nope.h5ad"), "--debug"])


def test_exit_status_through_python_m(tmp_path):
    """The real command (main's return value is the process's exit status)."""
    cmd = [sys.executable, "-m", "pyro_totalvi", "train", str(tmp_path / "nope.h5ad")]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and not done.stdout
    assert done.stderr.strip().startswith("python -m pyro_totalvi train: error: ")
    assert len(done.stderr.strip().splitlines()) == 1


def test_help_describes_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "``" not in text and "``" not in build_parser().format_help()
    train = next(a for a in build_parser()._subparsers._group_actions[0].choices.values())
    for action in train._actions:
        if action.dest in ("help", "input"):
            continue
        assert action.help and "default" in action.help, action.option_strings


# ---------------------------------------------------------------------------------------------
# What the command decided


def test_train_on_h5ad_reports_what_it_decided(tmp_path, sim_adata, capsys, caplog):
    """Genes kept by --n-genes, proteins used and masked, epochs, an unfinished warm-up."""
    a = sim_adata[:200].copy()
    protein = a.obsm["protein_expression"]
    protein.loc[a.obs["batch"] == "batch_1", protein.columns[:2]] = 0  # not measured there
    path = tmp_path / "in.h5ad"
    a.write_h5ad(path)
    out = tmp_path / "o"
    with caplog.at_level(logging.WARNING, logger="pyro_totalvi"):
        assert main(["train", str(path), "--out", str(out), "--n-genes", "50", "--max-epochs",
                     "2", "--batch-key", "batch", "--protein-mixture", "enumerate"]) == 0
    written = ad.read_h5ad(out / "adata_totalvi.h5ad")
    assert written.n_vars == 50 and written.obsm["X_totalvi"].shape == (200, 20)
    said = capsys.readouterr().out
    assert "kept the 50 most detected of 120 genes" in said
    assert "proteins: 12 used; treated as not measured" in said
    assert "2 in batch 'batch_1'" in said
    assert "trained all 2 epochs; best elbo_validation at epoch" in said
    assert "--n-steps-kl-warmup" in said  # 2 epochs of 1 step each: the warm-up is unfinished
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("KL warm-up" in w for w in warned)
    assert any("batch 'batch_1'" in w and protein.columns[0] in w for w in warned)


def test_report_of_early_stopping():
    history = pd.DataFrame({"elbo_validation": [5.0, 3.0, 4.0, 4.5], "elbo_train": 1.0,
                            "kl_weight": 1.0}, index=pd.RangeIndex(4, name="epoch"))
    model = SimpleNamespace(history=history, adata=SimpleNamespace(n_obs=1000))
    lines = []
    _report_training(model, SimpleNamespace(max_epochs=100), lines.append)
    assert lines == ["early stopping ended training at epoch 4 of 100 (the elbo_validation had "
                     "not improved for 45 epochs); best epoch 2"]
