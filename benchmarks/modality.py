#!/usr/bin/env python
"""How much RNA and protein each shape the latent space: shares, alternatives, balance knob.

Run from the repository root (``nice``, one thread: the machine is shared):

    OMP_NUM_THREADS=1 nice -n 10 benchmarks/.venv-scvi/bin/python benchmarks/modality.py \\
        --out-json /tmp/modality.json

(with the package venv instead, ``/work/main/.venv/bin/python``, the scvi-tools row is skipped).

Two parts (``--part sim``, ``--part bmmc``, default both):

* **sim**, known answers. ``pyro_totalvi.simulate`` with the group signal in the proteins only,
  in the RNA only, or in both; models trained with protein weight 0.5 / 1 / 2 on the last. For
  each, the mean protein share by four definitions: ``shapley`` (the package's
  ``get_modality_contributions``), ``loo_kl`` (KL of q(z|x,y) from q with one modality replaced
  by the reference cell, normalised), ``zero_kl`` (the same with the modality's input zeroed:
  "withheld") and ``integrated_gradients`` (path attribution of the posterior mean from the
  reference, ``--ig-steps`` midpoints, squared length in posterior sd as ``shapley``).
* **bmmc**, ``../shared/data/bmmc_cite_starter.h5ad`` (600 cells, 41 cell types, 2 donors, 134
  proteins): models with protein weight 0.5 / 1 / 2 (and weight 1 with a second seed); 5-NN
  cell-type accuracy of each latent (3-fold), of simple baselines (PCA of RNA, of protein, of
  both) and of scvi-tools' TOTALVI; the per-cell-type mean shares; agreement of the four
  definitions with a model-free proxy (per cell type: 5-NN accuracy on protein PCA minus on RNA
  PCA) and between two training seeds.

Only aggregated numbers are printed (nothing derived from the shared data is written into the
repository). No timings: costs are counted in encoder passes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
BMMC_PATH = REPO_ROOT.parent / "shared" / "data" / "bmmc_cite_starter.h5ad"
METHODS = ("shapley", "loo_kl", "zero_kl", "integrated_gradients")
SIM_CASES = (  # (name, rna_group_signal, protein_group_signal, protein weight)
    ("protein signal only", False, True, 1.0),
    ("RNA signal only", True, False, 1.0),
    ("both, protein weight 0.5", True, True, 0.5),
    ("both, protein weight 1", True, True, 1.0),
    ("both, protein weight 2", True, True, 2.0),
)

if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from pyro_totalvi import TOTALVI, simulate  # noqa: E402
from pyro_totalvi.modality import modality_shares  # noqa: E402


# --------------------------------------------------------------------------------------------
# the alternatives to the package's definition
# --------------------------------------------------------------------------------------------
def _kl_diag(loc1, scale1, loc2, scale2) -> torch.Tensor:
    """KL(N(loc1, scale1^2) || N(loc2, scale2^2)) summed over the last dimension."""
    var_ratio = (scale1 / scale2) ** 2
    return 0.5 * (var_ratio + ((loc1 - loc2) / scale2) ** 2 - 1 - var_ratio.log()).sum(-1)


def _normalise(energy: torch.Tensor) -> torch.Tensor:
    total = energy.sum(-1, keepdim=True)
    return torch.where(total > 0, energy / total.clamp_min(1e-30), torch.full_like(energy, 0.5))


@torch.no_grad()
def shares_leave_one_out(module, mb, x_ref, y_ref, zero: bool) -> torch.Tensor:
    """KL(q(z|x,y) || q(z|x_-m)) per modality m, normalised; x_-m replaces m's input by the
    reference cell (``zero=False``) or by zeros (``zero=True``, the modality "withheld")."""
    codes = mb.s.argmax(-1)
    x_bar = torch.zeros_like(mb.x) if zero else x_ref[codes]
    y_bar = torch.zeros_like(mb.y) if zero else y_ref[codes]
    rest = (mb.s, mb.log_library, mb.covariates, mb.protein_mask)
    loc, scale, _, _ = module.encode(mb.x, mb.y, *rest)
    kl_rna = _kl_diag(loc, scale, *module.encode(x_bar, mb.y, *rest)[:2])
    kl_pro = _kl_diag(loc, scale, *module.encode(mb.x, y_bar, *rest)[:2])
    return _normalise(torch.stack([kl_rna, kl_pro], -1))


def shares_integrated_gradients(module, mb, x_ref, y_ref, steps: int = 16) -> torch.Tensor:
    """Integrated gradients of the posterior mean along the straight path (log1p inputs) from
    the reference cell, summed per modality (forward-mode JVPs, ``steps`` midpoints); the two
    attribution vectors are sized in posterior sd as in the package's definition."""
    codes = mb.s.argmax(-1)
    mask = 1.0 if mb.protein_mask is None else mb.protein_mask.float()
    ux0, uy0 = torch.log1p(x_ref[codes]), torch.log1p(y_ref[codes]) * mask
    dx, dy = torch.log1p(mb.x) - ux0, torch.log1p(mb.y) * mask - uy0
    rest = (mb.s, mb.log_library, mb.covariates, mb.protein_mask)

    def mean(vx, vy):
        return module.encode(torch.expm1(vx), torch.expm1(vy), *rest)[0]

    att_x = att_y = 0.0
    for j in range(steps):
        a = (j + 0.5) / steps
        px, py = ux0 + a * dx, uy0 + a * dy
        att_x = att_x + torch.func.jvp(lambda v, py=py: mean(v, py), (px,), (dx,))[1] / steps
        att_y = att_y + torch.func.jvp(lambda v, px=px: mean(px, v), (py,), (dy,))[1] / steps
    with torch.no_grad():
        sigma = module.encode(*mb.args())[1]
        energy = torch.stack([((att_x / sigma) ** 2).sum(-1), ((att_y / sigma) ** 2).sum(-1)], -1)
    return _normalise(energy)


def all_shares(model, methods=METHODS, ig_steps: int = 16) -> dict[str, pd.DataFrame]:
    """Protein and RNA shares of every cell of ``model.adata`` by each definition."""
    model.module.eval()
    x_ref, y_ref = model._modality_reference()
    idx = np.arange(model.data.n_obs)
    funcs = {
        "shapley": lambda mb: torch.no_grad()(modality_shares)(model.module, mb, x_ref, y_ref),
        "loo_kl": lambda mb: shares_leave_one_out(model.module, mb, x_ref, y_ref, zero=False),
        "zero_kl": lambda mb: shares_leave_one_out(model.module, mb, x_ref, y_ref, zero=True),
        "integrated_gradients": lambda mb: shares_integrated_gradients(
            model.module, mb, x_ref, y_ref, ig_steps),
    }
    out = {}
    for name in methods:
        values = np.zeros((len(idx), 2), dtype=np.float32)
        for pos, mb in model._chunks(model.data, idx, 256):
            values[pos] = funcs[name](mb).detach().cpu().numpy()
        out[name] = pd.DataFrame(values, index=model.adata.obs_names, columns=["rna", "protein"])
    return out


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def knn_predictions(rep: np.ndarray, labels: np.ndarray, k: int = 5) -> np.ndarray:
    """Out-of-fold k-NN predictions (3 shuffled folds, fixed seed)."""
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.neighbors import KNeighborsClassifier

    folds = KFold(3, shuffle=True, random_state=0)
    return cross_val_predict(KNeighborsClassifier(k), rep, labels, cv=folds)


def train_ours(adata, weight: float, seed: int, epochs: int | None, **kwargs) -> TOTALVI:
    model = TOTALVI(adata, seed=seed, modality_weights={"rna": 1.0, "protein": weight}, **kwargs)
    model.train(max_epochs=epochs, seed=seed, progress_bar=False)
    return model


# --------------------------------------------------------------------------------------------
# part 1: simulations with a known answer
# --------------------------------------------------------------------------------------------
def sim_part(args) -> dict:
    n_cells, n_genes = (400, 50) if args.small else (1000, 200)
    rows = []
    for seed in range(args.sim_seeds):
        for name, rna, pro, weight in SIM_CASES:
            adata = simulate(n_cells, n_genes=n_genes, n_proteins=30, n_batches=2, n_groups=5,
                             seed=seed, rna_group_signal=rna, protein_group_signal=pro)
            TOTALVI.setup_anndata(adata, batch_key="batch")
            model = train_ours(adata, weight, seed, args.sim_epochs, n_latent=10)
            groups = adata.obs["group"].to_numpy()
            acc = float(np.mean(knn_predictions(model.get_latent_representation(), groups)
                                == groups))
            shares = all_shares(model, ig_steps=args.ig_steps)
            row = {"case": name, "seed": seed, "knn_accuracy": acc}
            row.update({m: float(s["protein"].mean()) for m, s in shares.items()})
            rows.append(row)
            print(json.dumps(row), flush=True)
    table = pd.DataFrame(rows).groupby("case", sort=False)[["knn_accuracy", *METHODS]]
    means = table.mean()
    summary = {
        "mean_protein_share": means.round(3).to_dict("index"),
        "sd_over_seeds": table.std(ddof=0).round(3).to_dict("index"),
        "gap_protein_only_minus_rna_only": (
            means.loc["protein signal only", list(METHODS)]
            - means.loc["RNA signal only", list(METHODS)]).round(3).to_dict(),
        "weight_2_minus_weight_0.5": (
            means.loc["both, protein weight 2", list(METHODS)]
            - means.loc["both, protein weight 0.5", list(METHODS)]).round(3).to_dict(),
    }
    return {"n_cells": n_cells, "n_genes": n_genes, "n_proteins": 30, "n_groups": 5,
            "epochs": args.sim_epochs, "seeds": args.sim_seeds, "rows": rows, **summary}


# --------------------------------------------------------------------------------------------
# part 2: BMMC
# --------------------------------------------------------------------------------------------
def baselines(adata, labels: np.ndarray) -> dict[str, np.ndarray]:
    """Out-of-fold 5-NN predictions on 20 PCs of log-normalised RNA, CLR protein and both."""
    from sklearn.decomposition import PCA

    x = np.asarray(adata.X.todense() if hasattr(adata.X, "todense") else adata.X, dtype=float)
    rna = np.log1p(x / x.sum(1, keepdims=True) * 1e4)
    logp = np.log1p(adata.obsm["protein_expression"].to_numpy(dtype=float))
    clr = logp - logp.mean(1, keepdims=True)
    reps = {"rna": rna, "protein": clr}
    out = {}
    for name, m in reps.items():
        m = (m - m.mean(0)) / (m.std(0) + 1e-8)
        reps[name] = PCA(20, random_state=0).fit_transform(m)
        out[f"PCA of {'log-normalised RNA' if name == 'rna' else 'CLR protein'}"] = (
            knn_predictions(reps[name], labels))
    both = np.hstack([reps["rna"], reps["protein"]])
    out["PCA of both (concatenated)"] = knn_predictions(both, labels)
    return out


def scvi_predictions(adata, labels: np.ndarray, epochs: int | None, seed: int):
    """scvi-tools TOTALVI's latent, 5-NN out-of-fold predictions; None without scvi-tools."""
    try:
        import scvi
    except ImportError:
        return None
    scvi.settings.seed = seed
    a = adata.copy()
    scvi.model.TOTALVI.setup_anndata(a, protein_expression_obsm_key="protein_expression",
                                     batch_key="batch")
    model = scvi.model.TOTALVI(a, n_latent=20)
    model.train(max_epochs=epochs or 400, enable_progress_bar=False)
    return knn_predictions(model.get_latent_representation(), labels)


def bmmc_part(args) -> dict:
    import anndata as ad

    if not BMMC_PATH.exists():
        print(f"{BMMC_PATH} is absent: BMMC part skipped", flush=True)
        return {"skipped": f"{BMMC_PATH} absent"}
    adata = ad.read_h5ad(BMMC_PATH)
    TOTALVI.setup_anndata(adata, batch_key="batch")
    labels = adata.obs["cell_type"].astype(str).to_numpy()
    preds, shares, elbos = {}, {}, {}
    for weight, seed in ((0.5, 0), (1.0, 0), (2.0, 0), (1.0, 1)):
        model = train_ours(adata, weight, seed, args.bmmc_epochs)
        key = f"ours, protein weight {weight:g}, seed {seed}"
        preds[key] = knn_predictions(model.get_latent_representation(), labels)
        shares[key] = all_shares(model, ig_steps=args.ig_steps)
        # reported at weight 1 whatever the training weight: comparable across the rows
        elbos[key] = model.get_elbo(indices=model.split["validation"])
        print(key, "5-NN", round(float(np.mean(preds[key] == labels)), 3), "ELBO val",
              round(elbos[key], 1), flush=True)
    preds.update(baselines(adata, labels))
    scvi_pred = scvi_predictions(adata, labels, args.bmmc_epochs, 0)
    if scvi_pred is not None:
        preds["scvi-tools TOTALVI, seed 0"] = scvi_pred
    return bmmc_summary(adata, labels, preds, shares, elbos)


def bmmc_summary(adata, labels, preds, shares, elbos) -> dict:
    """Accuracy per latent, per-cell-type shares, agreement with the proxy and across seeds."""
    from scipy.stats import pearsonr, spearmanr

    acc = {k: round(float(np.mean(p == labels)), 3) for k, p in preds.items()}
    main, other = "ours, protein weight 1, seed 0", "ours, protein weight 1, seed 1"
    types = pd.Series(labels, index=adata.obs_names, name="cell_type")
    by_type = {}
    for key, s in shares.items():
        t = s["shapley"].groupby(types.to_numpy()).mean()
        by_type[key] = t["protein"]
    counts = types.value_counts()
    # model-free proxy: per cell type, 5-NN accuracy on protein PCA minus on RNA PCA
    correct = pd.DataFrame({k: preds[k] == labels for k in
                            ("PCA of CLR protein", "PCA of log-normalised RNA")}, index=types.index)
    per_type = correct.groupby(types.to_numpy()).mean()
    proxy = per_type["PCA of CLR protein"] - per_type["PCA of log-normalised RNA"]
    table = pd.DataFrame({"n_cells": counts, **by_type, "proxy (protein - RNA 5-NN)": proxy})
    table = table.sort_values(main, ascending=False)
    big = counts.index[counts >= 5]
    agreement = {}
    for m in METHODS:
        type_share = shares[main][m].groupby(types.to_numpy()).mean()["protein"]
        agreement[m] = {
            "spearman_with_proxy_types_ge5_cells": round(float(spearmanr(
                type_share[big], proxy[big])[0]), 3),
            "pearson_cells_seed0_vs_seed1": round(float(pearsonr(
                shares[main][m]["protein"], shares[other][m]["protein"])[0]), 3),
            "mean_protein_share_by_weight": {k: round(float(s[m]["protein"].mean()), 3)
                                             for k, s in shares.items()},
        }
    return {"knn_accuracy": acc, "elbo_validation": {k: round(v, 2) for k, v in elbos.items()},
            "agreement": agreement, "n_types_ge5_cells": len(big),
            "per_type_protein_share": table.round(3).reset_index(names="cell_type")
            .to_dict("records"),
            "proxy_protein_minus_rna_knn": proxy.round(3).to_dict()}


# --------------------------------------------------------------------------------------------
def markdown(frame: pd.DataFrame, index: bool = True) -> str:
    """A GitHub table (``DataFrame.to_markdown`` needs tabulate, not installed everywhere)."""
    frame = frame.reset_index() if index else frame

    def cell(v):
        return f"{v:.3f}" if isinstance(v, (float, np.floating)) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |",
             "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(False)]
    return "\n".join(lines)


def print_report(res: dict) -> None:
    if "sim" in res:
        sim = res["sim"]
        print(f"\n## Simulations ({sim['n_cells']} cells, {sim['n_genes']} genes, "
              f"{sim['n_proteins']} proteins, {sim['n_groups']} groups; {sim['seeds']} seeds): "
              "mean protein share")
        frame = pd.DataFrame(sim["mean_protein_share"]).T
        print(markdown(frame))
        print("gap (protein only - RNA only):", sim["gap_protein_only_minus_rna_only"])
        print("weight 2 - weight 0.5:", sim["weight_2_minus_weight_0.5"])
    bmmc = res.get("bmmc", {})
    if "knn_accuracy" in bmmc:
        print("\n## BMMC: 5-NN cell-type accuracy (3-fold)")
        print(markdown(pd.Series(bmmc["knn_accuracy"], name="accuracy").to_frame()))
        print("validation ELBO (weight 1):", bmmc["elbo_validation"])
        print("\n## BMMC: agreement of the definitions")
        print(markdown(pd.DataFrame({m: {k: v for k, v in a.items() if not isinstance(v, dict)}
                                     for m, a in bmmc["agreement"].items()}).T))
        print("\n## BMMC: mean protein share per cell type (shapley)")
        print(markdown(pd.DataFrame(bmmc["per_type_protein_share"]), index=False))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=["sim", "bmmc", "all"], default="all")
    p.add_argument("--small", action="store_true", help="smoke mode: small data, few epochs")
    p.add_argument("--sim-seeds", type=int, default=3)
    p.add_argument("--sim-epochs", type=int, default=200)
    p.add_argument("--bmmc-epochs", type=int, default=None, help="default: 400 (scvi-tools')")
    p.add_argument("--ig-steps", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", default=None)
    args = p.parse_args(argv)
    if args.small:
        args.sim_seeds, args.sim_epochs, args.bmmc_epochs, args.ig_steps = 1, 20, 5, 4
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    res = {"args": vars(args)}
    if args.part in ("sim", "all"):
        res["sim"] = sim_part(args)
    if args.part in ("bmmc", "all"):
        res["bmmc"] = bmmc_part(args)
    print_report(res)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(res, indent=1))
    return res


if __name__ == "__main__":
    main()
