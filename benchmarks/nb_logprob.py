"""Micro-benchmark of the count log-likelihoods: forward + backward CPU time per call.

RNA: ``NegativeBinomial.log_prob`` on a 256 x 2000 minibatch with realistic sparsity (gene means
log-normal, one inverse dispersion per gene, log-normal; counts drawn from the NB: 72% zeros),
with its nonzero positions recorded as a sparse minibatch records them (where the module can). Proteins:
``NegativeBinomialMixture.log_prob`` on 256 x 30. Process CPU time (``time.process_time``), one
thread, the median of ``--repeats`` timings of ``--calls`` calls each, so that other jobs on the
machine inflate it less than wall-clock time would. ``--baseline FILE`` times another
``distributions.py`` (e.g. of an older checkout) in the same process, alternating with this one.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/nb_logprob.py --baseline OLD/distributions.py
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import numpy as np
import torch

from pyro_totalvi import distributions


def inputs(n_cells: int, n_genes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    gene_mean = torch.exp(torch.randn(n_genes, generator=g) * 1.5 - 2.0)
    library = torch.exp(torch.randn(n_cells, 1, generator=g) * 0.4 + 0.5)
    mu = (gene_mean * library).requires_grad_()
    theta = torch.exp(torch.randn(n_genes, generator=g) + 1.0).requires_grad_()
    rate = torch._standard_gamma(theta.detach().expand(n_cells, -1).contiguous(),
                                 generator=g) / theta.detach() * mu.detach()
    x = torch.poisson(rate, generator=g)
    return x, mu, theta


def cpu_time(fn, calls: int) -> float:
    """Seconds of CPU time per call, over ``calls`` calls."""
    start = time.process_time()
    for _ in range(calls):
        fn()
    return (time.process_time() - start) / calls


def workloads(module):
    """RNA and protein forward + backward passes with ``module``'s distributions."""
    x, mu, theta = inputs(256, 2000)
    if hasattr(module, "with_nonzero"):  # as a minibatch cut from a sparse matrix does
        x = module.with_nonzero(x.clone(), x.reshape(-1).nonzero().squeeze(-1))
    g = torch.Generator().manual_seed(1)
    y = torch.poisson(torch.rand(256, 30, generator=g) * 300, generator=g)
    mu1 = (torch.rand(256, 30, generator=g) * 50 + 1).requires_grad_()
    mu2 = (mu1.detach() * 3).requires_grad_()
    phi = (torch.rand(30, generator=g) * 20 + 1).requires_grad_()
    w = torch.randn(256, 30, generator=g).requires_grad_()
    return {
        f"RNA 256 x 2000 ({float((x == 0).float().mean()):.0%} zeros), NegativeBinomial":
            lambda: module.NegativeBinomial(mu, theta).log_prob(x).sum().backward(),
        "protein 256 x 30, NegativeBinomialMixture":
            lambda: module.NegativeBinomialMixture(mu1, mu2, phi, w).log_prob(y).sum().backward(),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--baseline", default=None, help="another distributions.py to time")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    modules = {"this": distributions}
    if args.baseline:
        spec = importlib.util.spec_from_file_location("baseline_distributions", args.baseline)
        modules["baseline"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(modules["baseline"])
    loads = {name: workloads(m) for name, m in modules.items()}
    times = {(name, task): [] for name in loads for task in loads[name]}
    for _ in range(args.repeats):  # alternate, so that load changes hit every variant alike
        for name, tasks in loads.items():
            for task, fn in tasks.items():
                fn()  # warm-up
                times[name, task].append(cpu_time(fn, args.calls))
    for (name, task), t in times.items():
        print(f"{name:8s} {task}: forward+backward median {1e3 * np.median(t):.3f} ms CPU "
              f"(min {1e3 * min(t):.3f})")


if __name__ == "__main__":
    main()
