"""Where the model's reading of the protein background comes from: the start of c and d.

One simulated setting of ``background.py`` (the same data and training), trained from
``--start default`` (``protein_background_prior``: one ``c`` per batch for every protein, from
scvi-tools' per-cell two-Gaussian fit), from the simulator's true ``c``, ``d`` or both, or from
the isotype controls' level (``isotype-level``), with the background preference
``--preference w``, the isotype controls declared or not (``--isotypes``) and any other module
option (``--module JSON``). Prints the ROC AUC of the foreground probability (non-isotype
proteins, all cells) beside the log-ratio baseline and the Bayes oracle, the held-out protein
ELBO (validation cells, the one scorer) and its terms, the mean of q(b_n) (the per-cell
background shift), and per protein (isotypes last) the learned ``c`` against the truth, the
loading ``lambda`` on the shift and the mean foreground probability. README, "Protein
background".

    python benchmarks/background_start.py --setting "95% positive, strong" --start true-c
    python benchmarks/background_start.py --setting all --start default --preference 0.001
    python benchmarks/background_start.py --setting "95% positive, weak" --isotypes
    python benchmarks/background_start.py --setting all --module '{"background_cell_scale": false}'
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

if str(Path(__file__).resolve().parent) not in sys.path:  # also when loaded by path (tests)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import background as bg  # noqa: E402

STARTS = ("default", "true-c", "true-d", "true-cd", "isotype-level")


def isotype_level(adata) -> np.ndarray:
    """Mean ``log1p`` count of the isotype controls over the cells of each batch ``(K,)``:
    the level that the isotypes, measuring background only, show for every antibody."""
    y = np.log1p(adata.obsm["protein_expression"][list(adata.uns["isotype_controls"])].to_numpy())
    batch = adata.obs["batch"].cat.codes.to_numpy()
    return np.array([y[batch == k].mean() for k in range(len(adata.obs["batch"].cat.categories))])


def set_start(module, adata, start: str) -> None:
    """Overwrite the module's initial ``c`` and/or ``d`` (Eq. 11) with the simulator's values
    (``adata.uns["true_protein_prior"]``), or (``"isotype-level"``) every non-isotype protein's
    ``c`` with :func:`isotype_level`; ``"default"`` leaves them as they are."""
    import torch

    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
    if start == "isotype-level":
        n_isotypes = len(adata.uns["isotype_controls"])  # the simulator appends them last
        with torch.no_grad():
            module.background_c[:-n_isotypes] = torch.as_tensor(isotype_level(adata),
                                                                 dtype=torch.float32)
        return
    which = start.removeprefix("true-") if start != "default" else ""
    prior = adata.uns["true_protein_prior"]
    with torch.no_grad():
        if "c" in which:
            module.background_c.copy_(torch.as_tensor(np.asarray(prior["c"]),
                                                      dtype=torch.float32))
        if "d" in which:
            module.background_log_d.copy_(torch.as_tensor(np.log(np.asarray(prior["d"])),
                                                          dtype=torch.float32))


def shift_mean(model) -> float:
    """Mean over the cells of q(b_n)'s location (its prior's is 0)."""
    import torch

    module, data = model.module, model.data
    module.eval()
    with torch.no_grad():
        mb = data.minibatch(np.arange(data.n_obs))
        q = module.background_scale_posterior(mb.y, mb.s, mb.covariates, mb.protein_mask)
    return float(q.loc.mean())


def run(setting: str, start: str, preference: float | None, epochs: int, small: bool,
        isotypes: bool = False, module: dict | None = None) -> dict:
    """Train on one setting from ``start`` (declaring the isotype controls with ``isotypes``;
    ``module``: more TOTALVI options); the numbers the script prints."""
    adata, _, proteins, truth = bg.simulated_setting(setting, small)
    T = len(proteins)
    kwargs = dict(module or {}, **({} if preference is None
                                  else {"background_preference": preference}))
    declare = {"isotype_controls": list(adata.uns["isotype_controls"])} if isotypes else {}
    model = bg._train_ours(adata, epochs, declare, lambda m: set_start(m.module, adata, start),
                           **kwargs)
    fg = model.get_protein_foreground_probability(protein_list=proteins, n_samples=10).to_numpy()
    c = model.module.background_c.detach().cpu().numpy()
    true_c = np.asarray(adata.uns["true_protein_prior"]["c"])
    loading = getattr(model.module, "background_loading", None)
    loading = np.zeros(len(c)) if loading is None else loading.detach().cpu().numpy()
    reference = bg.reference_aucs(adata, proteins, truth)
    parts = bg.protein_elbo_parts(model, model.split["validation"], proteins)
    names = list(adata.obsm["protein_expression"].columns)
    return {
        "setting": setting, "start": start, "preference": model.module.background_preference,
        "isotypes_declared": isotypes, "module": module or {}, "epochs": epochs,
        "auc": bg.auc(truth, fg), "auc_baseline": reference["log-ratio baseline"],
        "auc_oracle": reference["Bayes oracle"], "protein_elbo": sum(parts.values()),
        "protein_elbo_parts": parts,
        "shift_mean": shift_mean(model) if model.module.background_cell_scale else 0.0,
        "proteins": [{"name": p, "positive": float(truth[:, t].mean()) if t < T else 0.0,
                      "mean_foreground": float(fg[:, t].mean()) if t < T else 0.0,
                      "c": c[t].round(3).tolist(), "true_c": true_c[t].round(3).tolist(),
                      "loading": round(float(loading[t]), 3)} for t, p in enumerate(names)],
    }


def print_run(r: dict) -> None:
    parts = ", ".join(f"{k} {v:.2f}" for k, v in r["protein_elbo_parts"].items())
    print(f"{r['setting']}, start {r['start']}, w {r['preference']}, isotypes declared "
          f"{r['isotypes_declared']}, module {r['module']}, {r['epochs']} epochs: "
          f"AUC {r['auc']:.3f} (baseline {r['auc_baseline']:.3f}, oracle {r['auc_oracle']:.3f}), "
          f"held-out protein ELBO {r['protein_elbo']:.2f} ({parts}), "
          f"mean of q(b_n) {r['shift_mean']:.2f}")
    print(f"  {'protein':12s} {'positive':>8s} {'mean fg':>8s} {'lambda':>6s}  "
          "c (learned / true, per batch)")
    for p in r["proteins"]:
        c = " ".join(f"{v:.2f}" for v in p["c"])
        true_c = " ".join(f"{v:.2f}" for v in p["true_c"])
        print(f"  {p['name']:12s} {p['positive']:8.2f} {p['mean_foreground']:8.2f} "
              f"{p['loading']:6.2f}  {c} / {true_c}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="95% positive, strong",
                   help=f"one of {list(bg.SIM_SETTINGS)}, or 'all'")
    p.add_argument("--start", default="default", choices=STARTS)
    p.add_argument("--preference", type=float, default=None,
                   help="background_preference w (default: the package's)")
    p.add_argument("--isotypes", action="store_true",
                   help="declare the simulated isotype controls (isotype_controls=...)")
    p.add_argument("--module", type=json.loads, default=None,
                   help='more TOTALVI options as JSON, e.g. \'{"background_cell_scale": false}\'')
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--small", action="store_true", help="smoke mode: 400 cells, 3 epochs")
    p.add_argument("--out-json", default=None)
    args = p.parse_args()
    settings = list(bg.SIM_SETTINGS) if args.setting == "all" else [args.setting]
    unknown = [s for s in settings if s not in bg.SIM_SETTINGS]
    if unknown:
        p.error(f"unknown setting {unknown[0]!r}; choose from {list(bg.SIM_SETTINGS)} or 'all'")
    runs = []
    for setting in settings:
        runs.append(run(setting, args.start, args.preference, 3 if args.small else args.epochs,
                        args.small, args.isotypes, args.module))
        print_run(runs[-1])
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
