#!/usr/bin/env python
"""Label transfer across donors: pyro_totalvi's TOTALANVI vs scvi-tools' TOTALANVI vs k-NN.

Run from the repo root with the benchmark venv (see benchmarks/setup_env.sh):

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 benchmarks/.venv-scvi/bin/python benchmarks/labels.py

Data: ``../shared/data/bmmc_cite_starter.h5ad`` (600 bone-marrow cells, 2 donors ``s1d1`` /
``s1d2`` in ``obs["batch"]``, 41 expert cell types in ``obs["cell_type"]``). For each hidden donor
and seed, that donor's labels are replaced by ``"Unknown"`` and every method sees the same
AnnData (batch = donor); each predicts the hidden donor's cells, scored against the expert labels
by accuracy and balanced accuracy (mean recall over the cell types present in the hidden donor;
a type never labelled in the other donor cannot be predicted by any method and counts as missed).

Methods:

* ``ours``: ``pyro_totalvi.TOTALANVI(adata, n_latent=20).train(...)``, then ``predict()``;
* ``scvi``: ``scvi.external.TOTALANVI(adata, n_latent=20).train(...)`` (scvi-tools 1.4.2), then
  ``predict()``; all other settings at their defaults;
* ``knn``: a plain ``pyro_totalvi.TOTALVI(adata, n_latent=20)``, and a 15-nearest-neighbour
  classifier fitted on the labelled donor's latent means, applied to the hidden donor's;
* ``ours_pretrained``: ``TOTALANVI.from_totalvi_model`` of that same TOTALVI, trained with the
  default (shortened) number of epochs.

Every model trains ``--epochs`` epochs, minibatches of 128 (scvi-tools' TOTALANVI default),
``train_size=0.9`` and no early stopping; each method's optimiser, learning rate and KL warm-up
are its library's defaults (for the two TOTALANVIs these are the same: Adam at 1e-3, a KL
warm-up over 400 epochs). ``--scvi-plan-kwargs`` passes scvi-tools plan settings (e.g. its KL
warm-up), ``--ours-kwargs`` settings of our ``TOTALANVI(...)`` (e.g. ``latent_kl_warmup``).
Nothing derived from the data is written inside the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DATA = REPO_ROOT.parent / "shared" / "data" / "bmmc_cite_starter.h5ad"
N_LATENT = 20
BATCH_SIZE = 128
UNKNOWN = "Unknown"


def load(hidden: str, n_cells: int | None):
    """The data with ``obs["labels"]``: the expert label, ``"Unknown"`` on the hidden donor."""
    import anndata

    if not DATA.exists():
        sys.exit(f"data not found at {DATA} (it lives in ../shared/data beside the repo)")
    adata = anndata.read_h5ad(DATA)
    if n_cells:
        adata = adata[np.random.default_rng(0).permutation(adata.n_obs)[:n_cells]].copy()
    donors = set(adata.obs["batch"].astype(str))
    if hidden not in donors:
        sys.exit(f"--hidden {hidden!r} is not a donor of obs['batch']: {sorted(donors)}")
    labels = adata.obs["cell_type"].astype(str).to_numpy().copy()
    is_hidden = adata.obs["batch"].astype(str).to_numpy() == hidden
    labels[is_hidden] = UNKNOWN
    adata.obs["labels"] = labels
    return adata, is_hidden


def scores(pred, truth) -> dict:
    from sklearn.metrics import balanced_accuracy_score

    pred, truth = np.asarray(pred, dtype=str), np.asarray(truth, dtype=str)
    with warnings.catch_warnings():  # predicted types absent from the truth: expected
        warnings.simplefilter("ignore")
        balanced = balanced_accuracy_score(truth, pred)
    return {"accuracy": float((pred == truth).mean()), "balanced_accuracy": float(balanced)}


def train_kwargs(args):
    return dict(max_epochs=args.epochs, batch_size=BATCH_SIZE, train_size=0.9,
                early_stopping=False)


def run_ours(adata, args, seed):
    import pyro_totalvi as pt

    pt.TOTALANVI.setup_anndata(adata, batch_key="batch", labels_key="labels",
                               unlabeled_category=UNKNOWN)
    model = pt.TOTALANVI(adata, n_latent=N_LATENT, seed=seed,
                         **json.loads(args.ours_kwargs or "{}"))
    model.train(seed=seed, progress_bar=False, **train_kwargs(args))
    return model.predict()


def run_scvi(adata, args, seed):
    import scvi

    scvi.settings.seed = seed
    scvi.settings.dl_num_workers = 0
    scvi.external.TOTALANVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                          batch_key="batch", labels_key="labels",
                                          unlabeled_category=UNKNOWN)
    model = scvi.external.TOTALANVI(adata, n_latent=N_LATENT)
    model.train(enable_progress_bar=False, enable_model_summary=False,
                plan_kwargs=json.loads(args.scvi_plan_kwargs or "{}") or None,
                **train_kwargs(args))
    return model.predict()


def run_totalvi(adata, args, seed, is_hidden):
    """k-NN on a plain TOTALVI's latent space, and TOTALANVI started from that TOTALVI."""
    from sklearn.neighbors import KNeighborsClassifier

    import pyro_totalvi as pt

    pt.TOTALVI.setup_anndata(adata, batch_key="batch")
    totalvi = pt.TOTALVI(adata, n_latent=N_LATENT, seed=seed)
    totalvi.train(seed=seed, progress_bar=False, **train_kwargs(args))
    latent = totalvi.get_latent_representation()
    labels = adata.obs["labels"].to_numpy()
    knn = KNeighborsClassifier(15).fit(latent[~is_hidden], labels[~is_hidden])
    out = {"knn": knn.predict(latent)}
    if "ours_pretrained" in args.methods:
        anvi = pt.TOTALANVI.from_totalvi_model(totalvi, UNKNOWN, labels_key="labels")
        anvi.train(seed=seed, progress_bar=False, batch_size=BATCH_SIZE, early_stopping=False)
        out["ours_pretrained"] = anvi.predict()
    return out


def run(args) -> list[dict]:
    rows = []
    for hidden in args.hidden:
        for seed in args.seeds:
            adata, is_hidden = load(hidden, args.n_cells)
            truth = adata.obs["cell_type"].astype(str).to_numpy()[is_hidden]
            preds = {}
            if "ours" in args.methods:
                preds["ours"] = run_ours(adata.copy(), args, seed)
            if "scvi" in args.methods:
                preds["scvi"] = run_scvi(adata.copy(), args, seed)
            if {"knn", "ours_pretrained"} & set(args.methods):
                preds.update(run_totalvi(adata.copy(), args, seed, is_hidden))
            for method, pred in preds.items():
                row = {"hidden": hidden, "seed": seed, "method": method,
                       **scores(np.asarray(pred)[is_hidden], truth)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    import pandas as pd

    frame = pd.DataFrame(rows)
    table = frame.groupby(["hidden", "method"])[["accuracy", "balanced_accuracy"]].agg(
        ["mean", "std"])
    overall = frame.groupby("method")[["accuracy", "balanced_accuracy"]].mean()
    return (f"per hidden donor (mean and sd over seeds {sorted(set(frame.seed))}):\n"
            f"{table.round(3).to_string()}\n\nmean over donors and seeds:\n"
            f"{overall.round(3).to_string()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 1, 2])
    parser.add_argument("--hidden", type=lambda s: s.split(","), default=["s1d2", "s1d1"],
                        help="donor(s) whose labels are hidden, one run each")
    parser.add_argument("--methods", type=lambda s: s.split(","),
                        default=["ours", "scvi", "knn", "ours_pretrained"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-cells", type=int, default=None, help="subsample (smoke tests)")
    parser.add_argument("--scvi-plan-kwargs", default=None, help="JSON for scvi-tools' plan")
    parser.add_argument("--ours-kwargs", default=None,
                        help='JSON for our TOTALANVI(...), e.g. \'{"scale_encoder_input": true}\'')
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    rows = run(args)
    print(summarize(rows))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
