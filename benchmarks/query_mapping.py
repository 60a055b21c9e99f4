#!/usr/bin/env python
"""Reference mapping (scArches) against scvi-tools 1.4.2 on the same splits of real data.

Run from the repository root with the benchmark venv, where both packages import::

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD benchmarks/.venv-scvi/bin/python \\
        benchmarks/query_mapping.py --seeds 0 1 2

(``--sides ours`` runs with the project's own venv, without scvi-tools.) Splits, both with the
query's proteins hidden (an RNA-only query) and compared with what the query measured:

* ``pbmc``: ``pbmc10k5k_two_panels.h5ad``; reference = batch ``pbmc_5k`` (29 proteins), query =
  ``pbmc_10k``, whose 14 measured proteins (``uns["protein_panels"]``) are the truth; the
  2,000 genes most detected in the reference (no labels in the reference: no label agreement).
* ``bmmc``: ``bmmc_cite_starter.h5ad``; reference = donor ``s1d1``, query = donor ``s1d2``;
  1,000 genes, 134 proteins, 41 expert cell types (``obs["cell_type"]``).

Each side: ``setup_anndata`` on the reference, ``TOTALVI(ref)`` with default settings (side
``ours_scaled``: ``TOTALVI(ref, scale_encoder_input=True)``, scvi-tools 1.4's encoder input;
``ours_dropout``: that plus ``encoder_protein_dropout=0.5``, README's setting for a reference),
``train(max_epochs=--ref-epochs)``, ``prepare_query_anndata``, ``load_query_data`` (default freeze
flags), ``train(max_epochs=--query-epochs, plan_kwargs=dict(weight_decay=0.0))``, then on
reference + query cells ``get_latent_representation`` and on the query
``get_normalized_expression(transform_batch=<reference batch>, n_samples=25)``. Metrics:

* imputation: per protein, Pearson correlation of ``log1p`` imputed vs ``log1p`` measured counts
  over the query cells (proteins constant in the query are skipped); the median over proteins;
* label agreement: a 15-NN classifier on the reference cells' latent positions and labels
  predicts the query cells' labels; the fraction equal to their own labels;
* baseline: the same two with k-NN (k=15) on 20 principal components of ``log1p``-normalised RNA
  fitted on the reference (regression of ``log1p`` proteins / classification of labels).

scvi-tools' query gets a zero protein table with the reference's columns (its tutorial's recipe:
all-zero proteins of a batch count as not measured); ours gets none (the table is deleted).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
DATA = REPO_ROOT.parent / "shared" / "data"
#: ours with default settings; with scvi-tools 1.4's scaled encoder input; with that and modality
#: dropout in the encoder (the README's reference setting); scvi-tools
SIDES = ("ours", "ours_scaled", "ours_dropout", "scvi")
N_SAMPLES = 25
K = 15


# --------------------------------------------------------------------------------------------
# splits
def _select_genes(adata, n_genes: int):
    """The ``n_genes`` most detected genes of ``adata`` (the reference), in their order."""
    detected = np.asarray((adata.X > 0).sum(axis=0)).ravel()
    return adata.var_names[np.sort(np.argsort(-detected, kind="stable")[:n_genes])]


def load_split(name: str, n_genes: int = 2000) -> dict:
    """Reference AnnData, RNA-only query AnnData (all genes), the query's measured proteins."""
    import anndata as ad
    import scipy.sparse as sp

    if name == "pbmc":
        a = ad.read_h5ad(DATA / "pbmc10k5k_two_panels.h5ad")
        ref_batch, query_batch = "pbmc_5k", "pbmc_10k"
        measured = [str(p) for p in a.uns["protein_panels"][query_batch]]
        labels = None
    else:
        a = ad.read_h5ad(DATA / "bmmc_cite_starter.h5ad")
        ref_batch, query_batch = "s1d1", "s1d2"
        measured = [str(p) for p in a.obsm["protein_expression"].columns]
        labels = "cell_type"
    a.X = sp.csr_matrix(a.X, dtype=np.float32)
    a.obs["batch"] = a.obs["batch"].astype(str).astype("category")
    for k in [k for k in a.obsm if k != "protein_expression"]:
        del a.obsm[k]
    is_ref = (a.obs["batch"] == ref_batch).to_numpy()
    ref = a[is_ref].copy()
    ref = ref[:, _select_genes(ref, n_genes)].copy()
    ref.obs["batch"] = ref.obs["batch"].cat.remove_unused_categories()
    query = a[~is_ref].copy()
    query.obs["batch"] = query.obs["batch"].cat.remove_unused_categories()
    truth = query.obsm["protein_expression"][measured].copy()
    del query.obsm["protein_expression"]  # an RNA-only query
    truth = truth.loc[:, truth.std() > 0]
    return dict(name=name, ref=ref, query=query, truth=truth, ref_batch=ref_batch,
                labels=labels, proteins=list(ref.obsm["protein_expression"].columns))


# --------------------------------------------------------------------------------------------
# the two sides: the same call sequence
def run_ours(split: dict, seed: int, args, **model_kwargs) -> dict:
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    from pyro_totalvi import TOTALVI

    ref, query = split["ref"].copy(), split["query"].copy()
    TOTALVI.setup_anndata(ref, protein_expression_obsm_key="protein_expression",
                          batch_key="batch")
    model = TOTALVI(ref, seed=seed, **model_kwargs)
    model.train(max_epochs=args.ref_epochs, seed=seed, progress_bar=False)
    TOTALVI.prepare_query_anndata(query, model)
    qmodel = TOTALVI.load_query_data(query, model)
    qmodel.train(max_epochs=args.query_epochs, seed=seed, progress_bar=False,
                 plan_kwargs=dict(weight_decay=0.0))
    return _outputs(qmodel, ref, query, split["ref_batch"])


def run_scvi(split: dict, seed: int, args) -> dict:
    import logging

    import scvi

    scvi.settings.seed = seed
    scvi.settings.verbosity = logging.WARNING
    ref, query = split["ref"].copy(), split["query"].copy()
    # scvi-tools' tutorial recipe for an RNA-only query: zero proteins, the reference's columns
    query.obsm["protein_expression"] = pd.DataFrame(
        0.0, index=query.obs_names, columns=split["proteins"])
    scvi.model.TOTALVI.setup_anndata(ref, protein_expression_obsm_key="protein_expression",
                                     batch_key="batch")
    model = scvi.model.TOTALVI(ref)
    trainer = dict(accelerator="cpu", enable_progress_bar=False)
    model.train(max_epochs=args.ref_epochs, **trainer)
    scvi.model.TOTALVI.prepare_query_anndata(query, model)
    qmodel = scvi.model.TOTALVI.load_query_data(query, model)
    qmodel.train(max_epochs=args.query_epochs, plan_kwargs=dict(weight_decay=0.0), **trainer)
    return _outputs(qmodel, ref, query, split["ref_batch"])


def _outputs(qmodel, ref, query, ref_batch: str) -> dict:
    """Latent positions of reference and query cells, the query's imputed proteins."""
    _, protein = qmodel.get_normalized_expression(query, transform_batch=ref_batch,
                                                  n_samples=N_SAMPLES)
    return dict(z_ref=qmodel.get_latent_representation(ref),
                z_query=qmodel.get_latent_representation(query),
                protein=pd.DataFrame(np.asarray(protein), index=query.obs_names,
                                     columns=[str(c) for c in protein.columns]))


# --------------------------------------------------------------------------------------------
# metrics
def imputation_correlations(imputed: pd.DataFrame, truth: pd.DataFrame) -> pd.Series:
    """Per protein: Pearson correlation of log1p imputed vs log1p measured, over query cells."""
    pred = np.log1p(imputed[truth.columns].to_numpy(np.float64))
    obs = np.log1p(truth.to_numpy(np.float64))
    return pd.Series([np.corrcoef(pred[:, j], obs[:, j])[0, 1] for j in range(obs.shape[1])],
                     index=truth.columns)


def label_agreement(z_ref, ref_labels, z_query, query_labels) -> float:
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(K).fit(z_ref, ref_labels)
    return float(np.mean(knn.predict(z_query) == np.asarray(query_labels)))


def baseline(split: dict) -> dict:
    """k-NN on RNA principal components fitted on the reference (no model)."""
    from sklearn.decomposition import PCA
    from sklearn.neighbors import KNeighborsRegressor

    genes = split["ref"].var_names

    def lognorm(a):
        X = a[:, genes].X.toarray().astype(np.float64)
        return np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 1e4)

    pca = PCA(20, random_state=0).fit(lognorm(split["ref"]))
    pc_ref, pc_query = pca.transform(lognorm(split["ref"])), pca.transform(lognorm(split["query"]))
    y_ref = np.log1p(split["ref"].obsm["protein_expression"].to_numpy(np.float64))
    pred = KNeighborsRegressor(K).fit(pc_ref, y_ref).predict(pc_query)
    imputed = pd.DataFrame(np.expm1(pred), index=split["query"].obs_names,
                           columns=split["proteins"])
    return dict(z_ref=pc_ref, z_query=pc_query, protein=imputed)


def score(split: dict, out: dict) -> dict:
    cors = imputation_correlations(out["protein"], split["truth"])
    res = {"median_corr": float(cors.median()), "per_protein": cors.round(4).to_dict()}
    if split["labels"] is not None:
        res["label_agreement"] = label_agreement(
            out["z_ref"], split["ref"].obs[split["labels"]].astype(str), out["z_query"],
            split["query"].obs[split["labels"]].astype(str))
    return res


# --------------------------------------------------------------------------------------------
def report(split_name: str, results: dict) -> None:
    """Medians / label agreement per side and seed, then the per-protein table (seed mean)."""
    print(f"\n## {split_name}")
    rows = []
    for side, runs in results.items():
        for seed, r in runs.items():
            rows.append({"side": side, "seed": seed, "median_corr": r["median_corr"],
                         "label_agreement": r.get("label_agreement", np.nan)})
    frame = pd.DataFrame(rows)
    print(frame.round(3).to_string(index=False))
    print(frame.groupby("side")[["median_corr", "label_agreement"]].mean().round(3).to_string())
    table = pd.DataFrame({side: pd.DataFrame([r["per_protein"] for r in runs.values()]).mean()
                          for side, runs in results.items()})
    print(table.round(3).to_string())


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--splits", nargs="+", default=["pbmc", "bmmc"], choices=["pbmc", "bmmc"])
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--ref-epochs", type=int, default=200)
    p.add_argument("--query-epochs", type=int, default=200)
    p.add_argument("--n-genes", type=int, default=2000, help="pbmc: genes kept (bmmc has 1,000)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", type=Path, default=None)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    runners = {"ours": run_ours, "scvi": run_scvi,
               "ours_scaled": lambda *a: run_ours(*a, scale_encoder_input=True),
               "ours_dropout": lambda *a: run_ours(*a, scale_encoder_input=True,
                                                   encoder_protein_dropout=0.5)}
    everything = {"settings": {k: (str(v) if isinstance(v, Path) else v)
                               for k, v in vars(args).items()}}
    for name in args.splits:
        split = load_split(name, args.n_genes)
        results = {"kNN on RNA PCs": {"-": score(split, baseline(split))}}
        for side in args.sides:
            results[side] = {}
            for seed in args.seeds:
                start = time.time()
                results[side][seed] = score(split, runners[side](split, seed, args))
                print(f"[{name}] {side} seed {seed}: median corr "
                      f"{results[side][seed]['median_corr']:.3f}, label agreement "
                      f"{results[side][seed].get('label_agreement', float('nan')):.3f} "
                      f"({time.time() - start:.0f} s)", flush=True)
        report(name, results)
        everything[name] = results
        if args.out_json is not None:
            args.out_json.write_text(json.dumps(everything, indent=1, default=str))
    return everything


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
