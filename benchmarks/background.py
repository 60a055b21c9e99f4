"""Protein background: foreground calls against known truth, and held-out isotype controls.

Two parts (README, "Protein background"):

* ``sim``: data from ``pyro_totalvi.simulate`` with a known foreground indicator ``v`` (fraction
  of positive cells 5 %, 50 %, 95 %; strong and weak foreground; a per-cell background shift, 3
  isotype controls and empty droplets). ROC AUC, over all cells and non-isotype proteins, of
  the foreground probability of: pyro_totalvi as on ``main`` before this change ("before":
  E_q[1 - pi], alpha >= 1, background preference 1e-3), pyro_totalvi now with nothing declared
  ("plain"), with the isotypes declared, with isotypes and empty droplets; scvi-tools 1.4.2's
  ``get_protein_foreground_probability`` (E_q[1 - pi]); and the baseline that ranks each
  protein's ``log1p`` count against its batch median; and the Bayes oracle
  (:func:`bayes_oracle`: the posterior under the simulator's true parameters, the best ranking
  that the counts allow). Plus the held-out (validation cells) ELBO of the non-isotype
  proteins, relative to "before".
* ``real``: ``eccite_pbmc_500.h5ad`` (2 isotypes) and ``pbmc1k_protein_v3.h5ad`` (3): with one
  isotype held out of the declaration (the others declared), the held-out isotype's mean
  foreground probability after 100, 200 and 400 epochs (one run, resumed from its checkpoint:
  identical to separate runs of each length), for "before", "plain" (no isotype declared) and
  every held-out choice; scvi-tools' isotype means after runs of the same lengths.

Both sides train with ``early_stopping=False`` (epoch counts are exact), 256 cells per
minibatch, 90 % of the cells for training, seed 0. scvi-tools runs in the benchmark venv as a
child process (``--scvi-python``, default ``benchmarks/.venv-scvi/bin/python``; ``--no-scvi``
skips it). Real data are read from ``../shared/data`` and written, reduced to the 2,000 most
detected genes, only to a temporary directory.

    python benchmarks/background.py --part all            # the README table (long)
    python benchmarks/background.py --small --no-scvi     # smoke test (tests/test_benchmarks.py)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
SHARED = REPO_ROOT.parent / "shared" / "data"
REAL_FILES = ("eccite_pbmc_500.h5ad", "pbmc1k_protein_v3.h5ad")
EPOCHS_REAL = (100, 200, 400)
#: the module settings of ``main`` before this change, for the "before" rows
BEFORE = {"min_foreground_ratio": 1.0, "background_preference": 1e-3,
          "background_cell_scale": False}
SIM_COMMON = dict(n_cells=1500, n_genes=300, n_proteins=15, n_batches=2, n_groups=5, seed=0,
                  background_cell_sd=0.5, n_isotypes=3, n_empty_droplets=400)
STRONG, WEAK = (5.0, 20.0), (1.5, 3.0)
SIM_SETTINGS = {
    "5% positive, strong": dict(foreground_fraction=0.0, foreground_ratio=STRONG),
    "50% positive, strong": dict(foreground_fraction=0.5, foreground_ratio=STRONG),
    "95% positive, strong": dict(foreground_fraction=1.0, foreground_ratio=STRONG),
    "5% positive, weak": dict(foreground_fraction=0.0, foreground_ratio=WEAK),
    "50% positive, weak": dict(foreground_fraction=0.5, foreground_ratio=WEAK),
    "95% positive, weak": dict(foreground_fraction=1.0, foreground_ratio=WEAK),
}
TRAIN = dict(batch_size=256, train_size=0.9, early_stopping=False, seed=0, progress_bar=False)


def _ours():
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    import pyro_totalvi

    return pyro_totalvi


# -- scores ------------------------------------------------------------------------------------
def log_ratio_baseline(counts: np.ndarray, batch: np.ndarray) -> np.ndarray:
    """Each protein's ``log1p`` count minus its median over the cells of the same batch."""
    logs = np.log1p(counts)
    out = np.empty_like(logs)
    for b in np.unique(batch):
        cells = batch == b
        out[cells] = logs[cells] - np.median(logs[cells], axis=0)
    return out


def auc(truth_foreground: np.ndarray, score: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(truth_foreground.ravel(), score.ravel()))


def bayes_oracle(adata, n_proteins: int, n_nodes: int = 40) -> np.ndarray:
    """P(v_nt = 0 | y_nt) under the simulator's *true* parameters, ``(cells, n_proteins)``.

    Every parameter is known: pi_nt, alpha_nt, phi_t, the background prior c_t, d_t of the
    cell's batch and the cell's background shift b_n. Only the cell's own background draw
    log beta_nt ~ Normal(c_t + b_n, d_t) is integrated out (Gauss-Hermite, ``n_nodes`` points):

        P(v = 0 | y) = (1 - pi) L(alpha) / (pi L(1) + (1 - pi) L(alpha)),
        L(a) = E_{log beta}[NB(y; a beta, phi)].

    No method that sees only the counts can rank better on average: the ROC AUC of this
    posterior bounds what the model's foreground probability can reach in that setting.
    """
    from scipy.special import expit, logsumexp
    from scipy.stats import nbinom

    prior, T = adata.uns["true_protein_prior"], n_proteins
    batch = adata.obs["batch"].cat.codes.to_numpy()
    y = adata.obsm["protein_expression"].to_numpy()[:, :T, None].astype(float)
    shift = (adata.obs["true_background_shift"].to_numpy()[:, None]
             if "true_background_shift" in adata.obs else 0.0)
    log_mean = np.asarray(prior["c"])[:T, batch].T + shift
    sd, phi = np.asarray(prior["d"])[:T, batch].T, np.asarray(prior["phi"])[None, :T, None]
    nodes, weights = np.polynomial.hermite_e.hermegauss(n_nodes)
    log_beta = log_mean[..., None] + sd[..., None] * nodes

    def log_lik(a):  # log E NB(y; a beta, phi), over the nodes
        mu = a[..., None] * np.exp(log_beta)
        return logsumexp(nbinom.logpmf(y, phi, phi / (phi + mu)), b=weights / weights.sum(),
                         axis=-1)

    pi, alpha = adata.obsm["true_pi"][:, :T], adata.obsm["true_alpha"][:, :T]
    return expit(np.log1p(-pi) - np.log(pi) + log_lik(alpha) - log_lik(np.ones_like(alpha)))


def protein_elbo_parts(model, indices: np.ndarray, proteins: list[str]) -> dict:
    """Held-out ELBO per cell of ``proteins``, by term (the one scorer): ``"y"`` their
    log-likelihood, ``"beta"`` their background's -KL, ``"shift"`` the per-cell background
    shift's -KL, which they share (0 without one)."""
    from pyro_totalvi.scoring import protein_terms

    terms = protein_terms(model.module, model.data, np.asarray(indices))
    names = [str(p) for p in model.registry["protein_names"]]
    cols = [names.index(p) for p in proteins]
    return {"y": float(terms["y"][cols].sum()), "beta": float(terms["beta"][cols].sum()),
            "shift": float(terms.get("background_scale", np.zeros(1)).sum())}


def protein_elbo(model, indices: np.ndarray, proteins: list[str]) -> float:
    """Held-out ELBO per cell of ``proteins``: the sum of :func:`protein_elbo_parts`."""
    return sum(protein_elbo_parts(model, indices, proteins).values())


# -- scvi-tools (child process in the benchmark venv) -----------------------------------------
def scvi_child(spec: dict) -> None:
    """Train scvi-tools' TOTALVI once per epoch count; save E_q[1 - pi] per cell and protein."""
    import anndata
    import scvi
    import torch

    torch.set_num_threads(1)
    scvi.settings.seed = 0
    scvi.settings.verbosity = 30
    scvi.settings.dl_num_workers = 0
    adata = anndata.read_h5ad(spec["h5ad"])
    batch_key = "batch" if "batch" in adata.obs else None
    out = {}
    for epochs in spec["epochs"]:
        scvi.model.TOTALVI.setup_anndata(adata, protein_expression_obsm_key="protein_expression",
                                         batch_key=batch_key)
        model = scvi.model.TOTALVI(adata, n_latent=20)
        model.train(max_epochs=epochs, batch_size=256, train_size=0.9, early_stopping=False,
                    enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
        fg = model.get_protein_foreground_probability(n_samples=10, return_numpy=True)
        out[f"fg_{epochs}"] = np.asarray(fg, dtype=np.float32)
    np.savez(spec["out"], **out, version=np.array(scvi.__version__))


def run_scvi(args, adata, epochs, tmp: Path) -> dict | None:
    """scvi-tools' foreground probabilities ``{epochs: (cells, proteins)}``, or ``None``."""
    if args.no_scvi:
        return None
    python = Path(args.scvi_python)
    if not python.exists():
        print(f"[scvi-tools skipped: no interpreter at {python}; see benchmarks/setup_env.sh]")
        return None
    h5ad, out = tmp / "scvi_input.h5ad", tmp / "scvi_out.npz"
    slim = adata.copy()
    slim.uns = {}
    slim.obsm = {"protein_expression": adata.obsm["protein_expression"]}
    slim.write_h5ad(h5ad)
    spec = json.dumps({"h5ad": str(h5ad), "out": str(out), "epochs": list(epochs)})
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    subprocess.run([str(python), __file__, "--_scvi-child", spec], check=True, env=env)
    with np.load(out) as f:
        args.scvi_version = str(f["version"])
        return {e: f[f"fg_{e}"] for e in epochs}


# -- simulated data ----------------------------------------------------------------------------
def _train_ours(adata, epochs: int, declare: dict, before_training=None, **module):
    """Register a copy of ``adata`` (declaring isotypes / droplets as ``declare`` says), train;
    ``before_training(model)``, when given, runs between construction and training."""
    ptv = _ours()
    a = adata.copy()
    ptv.TOTALVI.setup_anndata(a, batch_key="batch" if "batch" in a.obs else None, **declare)
    model = ptv.TOTALVI(a, n_latent=20, **module)
    if before_training is not None:
        before_training(model)
    model.train(max_epochs=epochs, **TRAIN)
    return model


def simulated_setting(name: str, small: bool = False):
    """One setting's data: ``(adata, droplets, proteins, truth)``, with ``proteins`` the
    non-isotype proteins and ``truth`` their foreground indicator ``1 - v`` (cells x proteins)."""
    common = dict(SIM_COMMON, **({"n_cells": 400} if small else {}))
    adata, droplets = _ours().simulate(**common, **SIM_SETTINGS[name])
    isotypes = list(adata.uns["isotype_controls"])
    proteins = [p for p in adata.obsm["protein_expression"].columns if p not in isotypes]
    return adata, droplets, proteins, 1 - adata.obsm["true_v"][:, : len(proteins)]


def reference_aucs(adata, proteins: list[str], truth: np.ndarray) -> dict:
    """ROC AUC of the log-ratio baseline and of the Bayes oracle (no training)."""
    counts = adata.obsm["protein_expression"][proteins].to_numpy()
    return {"log-ratio baseline": auc(truth, log_ratio_baseline(counts,
                                                                adata.obs["batch"].to_numpy())),
            "Bayes oracle": auc(truth, bayes_oracle(adata, len(proteins)))}


def sim_setting(name: str, args, tmp: Path) -> dict:
    """AUCs and protein ELBOs for one simulated setting."""
    adata, droplets, proteins, truth = simulated_setting(name, args.small)
    isotypes = list(adata.uns["isotype_controls"])
    row = {"setting": name, "positive_fraction": float(truth.mean()),
           "auc": reference_aucs(adata, proteins, truth), "protein_elbo": {}}
    variants = {"before": ({}, BEFORE, False), "plain": ({}, {}, True),
                "isotypes": ({"isotype_controls": isotypes}, {}, True),
                "isotypes + droplets": ({"isotype_controls": isotypes,
                                         "empty_droplets": droplets}, {}, True)}
    for label, (declare, module, given_counts) in variants.items():
        model = _train_ours(adata, args.sim_epochs, declare, **module)
        fg = model.get_protein_foreground_probability(protein_list=proteins, n_samples=10,
                                                      given_counts=given_counts)
        row["auc"][label] = auc(truth, fg.to_numpy())
        row["protein_elbo"][label] = protein_elbo(model, model.split["validation"], proteins)
    scvi = run_scvi(args, adata, [args.sim_epochs], tmp)
    if scvi is not None:
        names = list(adata.obsm["protein_expression"].columns)
        row["auc"]["scvi-tools"] = auc(truth, scvi[args.sim_epochs][:, [names.index(p)
                                                                         for p in proteins]])
    print(json.dumps(row), flush=True)
    return row


# -- real data ---------------------------------------------------------------------------------
def _real_data(name: str, n_genes: int = 2000):
    import anndata

    from pyro_totalvi.__main__ import _select_genes

    path = SHARED / name
    if not path.exists():
        print(f"[{name} skipped: {path} is absent]")
        return None
    return _select_genes(anndata.read_h5ad(path), n_genes)


def real_run(adata, declared: list[str], epochs, module: dict, given_counts: bool,
             tmp: Path) -> dict:
    """Isotype mean foreground (and non-isotype protein ELBO) after each of ``epochs``."""
    ptv = _ours()
    a = adata.copy()
    isotypes = [str(i) for i in a.uns["isotype_controls"]]
    ptv.TOTALVI.setup_anndata(a, batch_key="batch" if "batch" in a.obs else None,
                              isotype_controls=declared or None)
    model = ptv.TOTALVI(a, n_latent=20, **module)
    proteins = [p for p in a.obsm["protein_expression"].columns if p not in isotypes]
    checkpoint = tempfile.mkdtemp(dir=tmp)
    out = {}
    for i, epochs_now in enumerate(epochs):
        model.train(max_epochs=epochs_now, checkpoint_dir=checkpoint, resume=i > 0, **TRAIN)
        fg = model.get_protein_foreground_probability(n_samples=10, given_counts=given_counts)
        out[epochs_now] = {
            "isotype_mean_foreground": {p: round(float(fg[p].mean()), 4) for p in isotypes},
            "protein_elbo": protein_elbo(model, model.split["validation"], proteins)}
    return out


def real_file(name: str, args, tmp: Path) -> dict | None:
    """Every variant on one real file: before, plain, and each isotype held out."""
    adata = _real_data(name)
    if adata is None:
        return None
    isotypes = [str(i) for i in adata.uns["isotype_controls"]]
    epochs = (2, 3) if args.small else EPOCHS_REAL
    runs = {"before": ([], BEFORE, False), "plain": ([], {}, True)}
    for held in isotypes:
        runs[f"held out {held}"] = ([i for i in isotypes if i != held], {}, True)
    result = {"file": name, "isotypes": isotypes, "runs": {}}
    for label, (declared, module, given_counts) in runs.items():
        result["runs"][label] = real_run(adata, declared, epochs, module, given_counts, tmp)
        print(name, label, json.dumps(result["runs"][label]), flush=True)
    scvi = run_scvi(args, adata, epochs, tmp)
    if scvi is not None:
        names = [str(c) for c in adata.obsm["protein_expression"].columns]
        result["runs"]["scvi-tools"] = {e: {"isotype_mean_foreground": {
            p: round(float(scvi[e][:, names.index(p)].mean()), 4) for p in isotypes}}
            for e in epochs}
        print(name, "scvi-tools", json.dumps(result["runs"]["scvi-tools"]), flush=True)
    return result


# -- tables ------------------------------------------------------------------------------------
def _rel(value: float, before: float) -> str:
    """ELBO change relative to ``before`` in percent (positive: better)."""
    return f"{100 * (value - before) / abs(before):+.2f} %"


def print_sim_table(rows: list[dict]) -> None:
    cols = ["Bayes oracle", "log-ratio baseline", "scvi-tools", "before", "plain", "isotypes",
            "isotypes + droplets"]
    print("\nROC AUC of the foreground probability (non-isotype proteins, all cells)\n")
    print("| setting | positive | " + " | ".join(cols) + " |")
    print("|---|---|" + "---|" * len(cols))
    for r in rows:
        cells = [f"{r['auc'][c]:.3f}" if c in r["auc"] else "-" for c in cols]
        print(f"| {r['setting']} | {r['positive_fraction']:.0%} | " + " | ".join(cells) + " |")
    print("\nHeld-out ELBO of the non-isotype proteins, change vs before\n")
    print("| setting | plain | isotypes | isotypes + droplets |\n|---|---|---|---|")
    for r in rows:
        e = r["protein_elbo"]
        print(f"| {r['setting']} | " + " | ".join(_rel(e[c], e["before"]) for c in
                                                  ("plain", "isotypes", "isotypes + droplets"))
              + " |")


def print_real_table(results: list[dict]) -> None:
    print("\nMean foreground probability of isotype controls (undeclared ones)\n")
    for res in results:
        epochs = list(next(iter(res["runs"].values())))
        print(f"\n{res['file']}\n\n| run | isotype | " + " | ".join(f"{e} ep" for e in epochs)
              + " |\n|---|---|" + "---|" * len(epochs))
        for label, run in res["runs"].items():
            shown = ([label.removeprefix("held out ")] if label.startswith("held out")
                     else res["isotypes"])
            for iso in shown:
                print(f"| {label} | {iso} | " + " | ".join(
                    f"{run[e]['isotype_mean_foreground'][iso]:.3f}" for e in epochs) + " |")
        before = res["runs"]["before"]
        print("\n| run | non-isotype protein ELBO vs before | " + " | ".join(
            f"{e} ep" for e in epochs) + " |\n|---|---|" + "---|" * len(epochs))
        for label, run in res["runs"].items():
            if label not in ("before", "scvi-tools"):
                print(f"| {label} | | " + " | ".join(
                    _rel(run[e]["protein_elbo"], before[e]["protein_elbo"]) for e in epochs)
                    + " |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--part", choices=("sim", "real", "all"), default="all")
    p.add_argument("--small", action="store_true", help="smoke mode: tiny data, few epochs")
    p.add_argument("--sim-epochs", type=int, default=200)
    p.add_argument("--settings", default=None,
                   help="semicolon-separated subset of the simulated settings (default: all)")
    p.add_argument("--scvi-python", default=str(HERE / ".venv-scvi" / "bin" / "python"))
    p.add_argument("--no-scvi", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out-json", default=None)
    p.add_argument("--_scvi-child", dest="scvi_child", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.scvi_child is not None:
        scvi_child(json.loads(args.scvi_child))
        return
    import torch

    torch.set_num_threads(args.threads)
    args.scvi_version = None
    if args.small:
        args.sim_epochs = 2
    out = {"sim": [], "real": []}
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("sim", "all"):
            names = args.settings.split(";") if args.settings else list(SIM_SETTINGS)
            for name in names[:1] if args.small else names:
                out["sim"].append(sim_setting(name, args, Path(tmp)))
        if args.part in ("real", "all"):
            for name in REAL_FILES[:1] if args.small else REAL_FILES:
                res = real_file(name, args, Path(tmp))
                if res is not None:
                    out["real"].append(res)
    out["scvi_version"] = args.scvi_version
    if out["sim"]:
        print_sim_table(out["sim"])
    if out["real"]:
        print_real_table(out["real"])
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
