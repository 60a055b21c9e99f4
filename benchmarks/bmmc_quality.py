"""Cell-type separation and batch mixing of the latent space on BMMC, ours vs scvi-tools.

On ``../shared/data/bmmc_cite_starter.h5ad`` (600 cells, 41 expert cell types, 2 donors,
134 proteins) each variant is trained for ``--epochs`` epochs with default settings and several
seeds; the latent means are scored by

- cell-type accuracy: 5-nearest-neighbour classifier of ``obs["cell_type"]``, 3-fold
  cross-validation (higher is better);
- batch predictability: the same classifier of the donor (lower is better mixing).

Variants of ours switch one difference to scvi-tools at a time (issue: composable blocks, "docs
that match the code"): ``prior_scale_mean`` initialises the scale of the background prior as
scvi-tools 1.4.2 does (the standard deviation of the *mean* over 100 cells, RMS / 10) instead of
the RMS of the per-cell standard deviations; ``preference_unwarmed`` leaves the background
preference factor at full weight during the KL warm-up (before: scvi-tools scales it).

Run (ours in the project venv, scvi-tools in the benchmark venv)::

    .venv/bin/python benchmarks/bmmc_quality.py --side ours --seeds 0 1 2
    benchmarks/.venv-scvi/bin/python benchmarks/bmmc_quality.py --side scvi --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "bmmc_cite_starter.h5ad"
VARIANTS = ("default", "prior_scale_mean", "preference_unwarmed")


def knn_accuracy(latent: np.ndarray, labels: np.ndarray, seed: int) -> float:
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    folds = StratifiedKFold(3, shuffle=True, random_state=seed)
    _, codes = np.unique(labels, return_inverse=True)
    counts = np.bincount(codes)
    keep = counts[codes] >= 3  # stratified 3-fold needs 3 cells of a class
    return float(cross_val_score(KNeighborsClassifier(5), latent[keep], codes[keep],
                                 cv=folds).mean())


def load():
    import anndata as ad

    if not DATA.exists():
        sys.exit(f"{DATA} is absent (it lives in ../shared/data beside the repository)")
    return ad.read_h5ad(DATA)


def latent_ours(adata, variant: str, seed: int, epochs: int) -> np.ndarray:
    sys.path.insert(0, str(ROOT))
    from pyro import poutine

    import pyro_totalvi.api as api
    from pyro_totalvi import TOTALVI, TotalVIModule
    from pyro_totalvi.data import protein_background_prior

    class Unwarmed(TotalVIModule):
        """The background preference at full weight during the KL warm-up (main before)."""

        def model(self, *args, kl_weight=1.0, **kwargs):
            self._kl_weight = kl_weight
            return super().model(*args, kl_weight=kl_weight, **kwargs)

        def background_penalty(self, pi_logits):
            with poutine.scale(scale=1.0 / self._kl_weight):  # undoes the warm-up's scale
                super().background_penalty(pi_logits)

    def prior_of_the_mean(data, n_cells=100, seed=0):
        mean, scale = protein_background_prior(data, n_cells, seed)
        return mean, scale / np.sqrt(n_cells)  # the SD of the mean over n_cells, as scvi-tools

    if variant == "prior_scale_mean":
        api.protein_background_prior = prior_of_the_mean
    try:
        TOTALVI.setup_anndata(adata, batch_key="batch")
        module_class = Unwarmed if variant == "preference_unwarmed" else TotalVIModule
        model = TOTALVI(adata, seed=seed, module_class=module_class)
        model.train(max_epochs=epochs, seed=seed, progress_bar=False)
    finally:
        api.protein_background_prior = protein_background_prior
    return model.get_latent_representation()


def latent_scvi(adata, seed: int, epochs: int) -> np.ndarray:
    import scvi

    scvi.settings.seed = seed
    scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                     batch_key="batch")
    model = scvi.model.TOTALVI(adata)
    model.train(max_epochs=epochs, enable_progress_bar=False)
    return model.get_latent_representation()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=["ours", "scvi"], default="ours")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="*", type=int, default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-json", default=None)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    variants = ["scvi-tools 1.4.2"] if args.side == "scvi" else args.variants
    rows = []
    for variant in variants:
        for seed in args.seeds:
            adata = load()
            if args.side == "scvi":
                latent = latent_scvi(adata, seed, args.epochs)
            else:
                latent = latent_ours(adata, variant, seed, args.epochs)
            row = {"variant": variant, "seed": seed,
                   "cell_type_acc": knn_accuracy(latent, adata.obs["cell_type"].to_numpy(), seed),
                   "batch_acc": knn_accuracy(latent, adata.obs["batch"].to_numpy(), seed)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'variant':24s} {'cell type 5-NN acc':>22s} {'batch 5-NN acc':>18s}")
    for variant in variants:
        sel = [r for r in rows if r["variant"] == variant]
        ct = np.array([r["cell_type_acc"] for r in sel])
        ba = np.array([r["batch_acc"] for r in sel])
        print(f"{variant:24s} {ct.mean():9.3f} ({ct.min():.3f}-{ct.max():.3f}) "
              f"{ba.mean():9.3f} ({ba.min():.3f}-{ba.max():.3f})")
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
