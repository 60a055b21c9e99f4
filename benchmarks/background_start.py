"""Where the plain model's reading of the protein background comes from: the start of c and d.

One simulated setting of ``background.py`` (the same data and training), trained from
``--start default`` (``protein_background_prior``: one ``c`` per batch for every protein, from
scvi-tools' per-cell two-Gaussian fit) or from the simulator's true ``c``, ``d`` or both, with the
background preference ``--preference w``. Prints the ROC AUC of the foreground probability
(non-isotype proteins, all cells) beside the log-ratio baseline and the Bayes oracle, the
held-out protein ELBO (validation cells, the one scorer), the mean of q(b_n) (the per-cell
background shift), and per protein the learned ``c`` against the truth and the mean foreground
probability. README, "Protein background".

    python benchmarks/background_start.py --setting "95% positive, strong" --start true-c
    python benchmarks/background_start.py --setting all --start default --preference 0.001
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

STARTS = ("default", "true-c", "true-d", "true-cd")


def set_start(module, adata, start: str) -> None:
    """Overwrite the module's initial ``c`` and/or ``d`` (Eq. 11) with the simulator's values
    (``adata.uns["true_protein_prior"]``); ``"default"`` leaves them as they are."""
    import torch

    if start not in STARTS:
        raise ValueError(f"start must be one of {STARTS}, got {start!r}")
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


def run(setting: str, start: str, preference: float | None, epochs: int, small: bool) -> dict:
    """Train the plain model on one setting from ``start``; the numbers the script prints."""
    adata, _, proteins, truth = bg.simulated_setting(setting, small)
    T = len(proteins)
    kwargs = {} if preference is None else {"background_preference": preference}
    model = bg._train_ours(adata, epochs, {}, lambda m: set_start(m.module, adata, start),
                           **kwargs)
    fg = model.get_protein_foreground_probability(protein_list=proteins, n_samples=10).to_numpy()
    c = model.module.background_c.detach().cpu().numpy()[:T]
    true_c = np.asarray(adata.uns["true_protein_prior"]["c"])[:T]
    reference = bg.reference_aucs(adata, proteins, truth)
    return {
        "setting": setting, "start": start, "preference": model.module.background_preference,
        "epochs": epochs, "auc": bg.auc(truth, fg),
        "auc_baseline": reference["log-ratio baseline"], "auc_oracle": reference["Bayes oracle"],
        "protein_elbo": bg.protein_elbo(model, model.split["validation"], proteins),
        "shift_mean": shift_mean(model),
        "proteins": [{"name": p, "positive": float(truth[:, t].mean()),
                      "mean_foreground": float(fg[:, t].mean()), "c": c[t].round(3).tolist(),
                      "true_c": true_c[t].round(3).tolist()} for t, p in enumerate(proteins)],
    }


def print_run(r: dict) -> None:
    print(f"{r['setting']}, start {r['start']}, w {r['preference']}, {r['epochs']} epochs: "
          f"AUC {r['auc']:.3f} (baseline {r['auc_baseline']:.3f}, oracle {r['auc_oracle']:.3f}), "
          f"held-out protein ELBO {r['protein_elbo']:.2f}, mean of q(b_n) {r['shift_mean']:.2f}")
    print(f"  {'protein':12s} {'positive':>8s} {'mean fg':>8s}  c (learned / true, per batch)")
    for p in r["proteins"]:
        c = " ".join(f"{v:.2f}" for v in p["c"])
        true_c = " ".join(f"{v:.2f}" for v in p["true_c"])
        print(f"  {p['name']:12s} {p['positive']:8.2f} {p['mean_foreground']:8.2f}  "
              f"{c} / {true_c}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--setting", default="95% positive, strong",
                   help=f"one of {list(bg.SIM_SETTINGS)}, or 'all'")
    p.add_argument("--start", default="default", choices=STARTS)
    p.add_argument("--preference", type=float, default=None,
                   help="background_preference w (default: the package's)")
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
                        args.small))
        print_run(runs[-1])
    if args.out_json:
        with open(args.out_json, "w") as f:
            json.dump(runs, f, indent=1)


if __name__ == "__main__":
    main()
