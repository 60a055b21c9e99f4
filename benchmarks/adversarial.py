#!/usr/bin/env python
"""The adversarial batch classifier: its effect on batch mixing and on imputing missing proteins.

Run from the repo root with the benchmark venv (scvi-tools 1.4.2 beside pyro_totalvi):

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD benchmarks/.venv-scvi/bin/python benchmarks/adversarial.py

Two real data sets from ../shared/data, each with proteins hidden where their counts are known:

* ``pbmc10k5k``: pbmc10k5k_two_panels.h5ad (400 cells, the 2,000 most detected genes). Batch
  pbmc_10k measured 14 of the 29 proteins; every other one of those 14 is hidden too (set to 0
  there, as the 15 it never measured), and imputed from pbmc_5k, which measured all 29.
* ``bmmc``: bmmc_cite_starter.h5ad (600 cells, 1,000 genes, 134 proteins, 2 donors). The
  second donor's proteins are all hidden: an RNA-only batch beside a CITE-seq one.

Hidden proteins are all zero in their batch, so both packages treat them as not measured there
(scvi-tools' protein batch mask; pyro_totalvi's default) and both choose the classifier by
default. Per run (same AnnData, default architecture and training settings, early stopping):

* batch mixing: 5-fold k-nearest-neighbour (k=15) accuracy of predicting the batch from the
  latent space (lower = better mixed; the majority batch's share is the floor);
* cell types kept apart: the same for ``obs["cell_type"]`` (bmmc; pbmc10k5k: pbmc_10k's
  labelled cells only);
* imputation: per hidden protein, Pearson correlation of ``log1p`` of the imputed protein
  (``get_normalized_expression(transform_batch=<measuring batch>, n_samples=25)``) with
  ``log1p`` of the hidden counts, over the hidden batch's cells; the median over proteins.
  Baseline: k-nearest-neighbour regression (k=15) of ``log1p`` protein counts on 20 principal
  components of ``log1p`` normalised RNA, fitted on the measuring batch.

Nothing is written into the repository; ``--out-json`` writes the rows elsewhere.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

REPO_ROOT = Path(__file__).resolve().parent.parent
DATA = REPO_ROOT.parent / "shared" / "data"
CONFIGS = {  # name: (package, adversarial_classifier)
    "ours": ("ours", False),
    "ours+classifier": ("ours", True),
    "scvi+classifier": ("scvi", True),
    "scvi": ("scvi", False),
}


def _select_genes(adata, n_genes):
    sys.path.insert(0, str(REPO_ROOT))
    from pyro_totalvi.__main__ import _select_genes as select

    return select(adata, n_genes)


def load(name: str):
    """``(adata, hidden batch, measuring batch, hidden proteins, true counts of them)``."""
    import anndata as ad

    if name == "pbmc10k5k":
        adata = _select_genes(ad.read_h5ad(DATA / "pbmc10k5k_two_panels.h5ad"), 2000)
        hidden_batch, source = "pbmc_10k", "pbmc_5k"
        cells = (adata.obs["batch"] == hidden_batch).to_numpy()
        measured = np.asarray(adata.obsm["protein_measured"])[cells].all(axis=0)
        names = list(adata.obsm["protein_expression"].columns)
        hidden = [names[t] for t in np.flatnonzero(measured)][::2]
    else:
        adata = ad.read_h5ad(DATA / "bmmc_cite_starter.h5ad")
        hidden_batch, source = list(adata.obs["batch"].cat.categories)[1], \
            list(adata.obs["batch"].cat.categories)[0]
        hidden = list(adata.obsm["protein_expression"].columns)
    cells = (adata.obs["batch"] == hidden_batch).to_numpy()
    protein = adata.obsm["protein_expression"].copy()
    truth = protein.loc[cells, hidden].to_numpy(dtype=float)
    protein.loc[cells, hidden] = 0
    adata.obsm["protein_expression"] = protein
    for key in ("protein_measured",):
        adata.obsm.pop(key, None)  # hidden proteins: not measured there, by their zeros
    adata.obs["batch"] = adata.obs["batch"].astype(str).astype("category")
    return adata, hidden_batch, source, hidden, truth


def knn_accuracy(latent, labels, k=15) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    labels = np.asarray(labels)
    keep = pd.Series(labels).map(pd.Series(labels).value_counts()) >= 5  # 5 folds
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    return float(cross_val_score(KNeighborsClassifier(k), latent[keep.to_numpy()],
                                 labels[keep.to_numpy()], cv=cv).mean())


def median_pearson(imputed: np.ndarray, truth: np.ndarray) -> float:
    a, b = np.log1p(imputed), np.log1p(truth)
    r = [np.corrcoef(a[:, j], b[:, j])[0, 1] for j in range(a.shape[1])
         if a[:, j].std() > 0 and b[:, j].std() > 0]
    return float(np.median(r))


def knn_baseline(adata, cells, source_cells, hidden) -> np.ndarray:
    """log1p protein counts predicted from RNA principal components by 15 nearest neighbours
    of the measuring batch (returned as counts, expm1)."""
    import scipy.sparse as sp
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsRegressor

    x = adata.X.toarray() if sp.issparse(adata.X) else np.asarray(adata.X)
    x = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    pcs = PCA(20, random_state=0).fit_transform(x)
    y = np.log1p(adata.obsm["protein_expression"].loc[source_cells, hidden].to_numpy(float))
    fit = KNeighborsRegressor(15).fit(pcs[source_cells], y)
    return np.expm1(fit.predict(pcs[cells]))


def train(package: str, adversarial: bool, adata, seed: int, max_epochs: int | None):
    """A trained model of ``package`` on a copy of ``adata`` (default settings)."""
    a = adata.copy()
    if package == "scvi":
        import scvi

        scvi.settings.seed = seed
        scvi.model.TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression",
                                         batch_key="batch")
        model = scvi.model.TOTALVI(a)
        model.train(max_epochs=max_epochs, adversarial_classifier=adversarial,
                    enable_progress_bar=False)
        epochs = len(model.history["elbo_train"])
    else:
        sys.path.insert(0, str(REPO_ROOT))
        from pyro_totalvi import TOTALVI

        TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression",
                              batch_key="batch")
        model = TOTALVI(a, seed=seed)
        model.train(max_epochs=max_epochs, seed=seed, progress_bar=False,
                    adversarial_classifier=adversarial)
        epochs = len(model.history)
    return model, a, epochs


def run_one(name, data, config, seed, max_epochs=None) -> dict:
    adata, hidden_batch, source, hidden, truth = data
    package, adversarial = CONFIGS[config]
    start = time.process_time()
    model, a, epochs = train(package, adversarial, adata, seed, max_epochs)
    latent = model.get_latent_representation()
    cells = (a.obs["batch"] == hidden_batch).to_numpy()
    _, protein = model.get_normalized_expression(transform_batch=source, n_samples=25)
    imputed = np.asarray(protein.loc[cells, hidden] if isinstance(protein, pd.DataFrame)
                         else protein[cells][:, [list(a.obsm["protein_expression"].columns)
                                                 .index(h) for h in hidden]])
    labelled = cells if name == "pbmc10k5k" else np.ones(a.n_obs, bool)
    types = a.obs["cell_type"].astype(str).to_numpy()
    return {"data": name, "config": config, "seed": seed, "epochs": epochs,
            "batch_knn": knn_accuracy(latent, a.obs["batch"].to_numpy()),
            "cell_type_knn": knn_accuracy(latent[labelled], types[labelled]),
            "median_pearson": median_pearson(imputed, truth),
            "cpu_s": round(time.process_time() - start, 1)}


def summarize(rows: list[dict], baselines: dict) -> str:
    frame = pd.DataFrame(rows)
    table = frame.groupby(["data", "config"])[["batch_knn", "cell_type_knn", "median_pearson",
                                              "epochs"]].agg(["mean", "std"]).round(3)
    lines = [table.to_string(), ""]
    for name, (majority, pearson) in baselines.items():
        lines.append(f"{name}: majority batch share {majority:.3f}; kNN-on-RNA imputation "
                     f"median Pearson {pearson:.3f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", nargs="+", default=["pbmc10k5k", "bmmc"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="default: each package's own rule (400 here), early stopping on")
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("pyro_totalvi").setLevel(logging.ERROR)
    logging.getLogger("scvi").setLevel(logging.ERROR)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    rows, baselines = [], {}
    for name in args.data:
        data = load(name)
        adata, hidden_batch, source, hidden, truth = data
        cells = (adata.obs["batch"] == hidden_batch).to_numpy()
        majority = adata.obs["batch"].value_counts(normalize=True).max()
        baselines[name] = (majority, median_pearson(
            knn_baseline(adata, cells, (adata.obs["batch"] == source).to_numpy(), hidden), truth))
        print(f"{name}: {adata.n_obs} cells x {adata.n_vars} genes; {len(hidden)} proteins "
              f"hidden in {hidden_batch}, imputed from {source}", flush=True)
        for seed in args.seeds:
            for config in args.configs:
                rows.append(run_one(name, data, config, seed, args.max_epochs))
                print(json.dumps(rows[-1]), flush=True)
    print(summarize(rows, baselines))
    if args.out_json:
        Path(args.out_json).write_text(json.dumps({"rows": rows, "baselines": baselines},
                                                  indent=1))


if __name__ == "__main__":
    main()
