"""scvi-tools' argument names for :class:`~pyro_totalvi.TOTALVI`, translated or refused clearly.

scvi-tools' ``TOTALVI`` takes module settings as ``**model_kwargs`` and passes ``train``'s
``plan_kwargs``, ``datasplitter_kwargs`` and ``**kwargs`` on to its Lightning training plan, data
splitter and trainer. Here they are read into the settings of :func:`pyro_totalvi.train.train`,
and a name that means nothing here raises a ``TypeError`` that lists the accepted names (not a
bare ``TypeError`` from deep inside), so a typo or an unsupported option never passes silently.
"""

from __future__ import annotations

import inspect
import warnings

import torch

__all__ = ["model_settings", "train_settings", "devices_to_device", "MODULE_CHOICES"]

#: scvi-tools ``TOTALVI``/``TOTALVAE`` settings whose only value here is scvi-tools' default:
#: accepted at that value, refused (with the reason) at any other.
MODULE_CHOICES = {
    "gene_likelihood": ("nb", "a zero-inflated RNA likelihood is a 5-line subclass overriding "
                              "rna_likelihood (README, tutorials/03_extending_the_model.ipynb)"),
    "gene_dispersion": ("gene", "per-batch or per-label dispersions: subclass TotalVIModule and "
                                "override rna_likelihood"),
    "protein_dispersion": ("protein", "per-batch protein dispersions: subclass TotalVIModule "
                                      "and override protein_likelihood"),
    "latent_distribution": ("normal", "only the Gaussian latent space of the totalVI paper"),
    "log_variational": (True, "the encoder always reads log1p(counts)"),
    "n_layers_decoder": (1, "the decoders have one hidden layer, as scvi-tools' default"),
    "use_batch_norm": ("both", "BatchNorm is used in encoder and decoders, as scvi-tools' "
                               "default"),
    "use_layer_norm": ("none", "no LayerNorm, as scvi-tools' default"),
}

#: Plan settings (scvi-tools ``plan_kwargs``) and the train() arguments they become.
PLAN_KEYS = ("lr", "weight_decay", "eps", "n_steps_kl_warmup", "n_epochs_kl_warmup",
             "reduce_lr_on_plateau", "lr_factor", "lr_patience", "lr_threshold", "lr_min",
             "lr_scheduler_metric", "max_kl_weight", "min_kl_weight", "optimizer")
#: Trainer settings (scvi-tools ``**kwargs`` of ``train``) that act here.
TRAINER_KEYS = ("early_stopping_patience", "early_stopping_monitor", "early_stopping_min_delta",
                "enable_progress_bar")
#: Lightning display and logging settings: accepted, nothing to do (history always has lr).
DISPLAY_KEYS = ("enable_model_summary", "log_every_n_steps", "simple_progress_bar",
                "progress_bar_refresh_rate", "num_sanity_val_steps", "benchmark",
                "learning_rate_monitor")
#: Data-splitter settings that act here; the data-loader ones below do not apply (minibatches
#: are cut from in-memory arrays by the training loop, without a torch DataLoader).
SPLIT_KEYS = ("train_size", "validation_size", "shuffle_set_split", "external_indexing")
LOADER_KEYS = ("pin_memory", "num_workers", "persistent_workers", "load_sparse_tensor",
               "drop_last")


def _refuse(unknown, accepted, what: str) -> None:
    if unknown:
        raise TypeError(f"{what}: unexpected {sorted(unknown)}; accepted: {sorted(accepted)}")


def model_settings(kwargs: dict, module_class) -> dict:
    """``TOTALVI(**kwargs)`` minus scvi-tools' settings that hold their default here.

    Raises ``ValueError`` for such a setting at another value (naming the way to get it) and
    ``TypeError`` for a name that ``module_class`` does not take, listing those it takes.
    """
    kwargs = dict(kwargs)
    for name, (value, how) in MODULE_CHOICES.items():
        if name in kwargs:
            given = kwargs.pop(name)
            if given != value:
                raise ValueError(f"{name}={given!r} is not available in pyro_totalvi (only "
                                 f"{value!r}): {how}")
    params = inspect.signature(module_class.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs  # the subclass takes anything; its __init__ checks
    # set by TOTALVI from the registered data (isotype controls and empty droplets are
    # setup_anndata arguments), never by the user
    own = {"self", "n_genes", "n_proteins", "n_batches", "n_covariates", "library_log_means",
           "library_log_vars", "background_prior_mean", "background_prior_scale", "n_panels",
           "use_size_factor_key", "isotype_controls", "empty_droplets"}
    accepted = {"n_latent", "protein_mixture", "use_observed_lib_size", "seed",
                "empirical_protein_background_prior", "override_missing_proteins",
                "module_class", *MODULE_CHOICES, *(set(params) - own)}
    _refuse(set(kwargs) - set(params) - own, accepted, "TOTALVI()")
    return kwargs


def devices_to_device(devices, device):
    """scvi-tools' ``devices`` (Lightning: ``"auto"``, a number of devices, or a list of device
    indices) as this package's single ``device``; several devices need ``strategy="ddp"``."""
    if devices in ("auto", None):
        return device
    if isinstance(devices, (list, tuple)):
        if len(devices) != 1:
            raise ValueError(f"devices={devices!r}: one process trains on one device; start one "
                             "process per device with torchrun and pass strategy='ddp'")
        chosen = devices[0]
    elif isinstance(devices, int) and not isinstance(devices, bool):
        if devices != 1:
            raise ValueError(f"devices={devices}: one process trains on one device; start "
                             f"{devices} processes with torchrun --nproc-per-node {devices} and "
                             "pass strategy='ddp' (README, 'Training on several GPUs')")
        return device
    else:
        chosen = devices  # "cuda:1", torch.device
    if device not in ("auto", None) and str(device) != str(chosen):
        raise ValueError(f"devices={devices!r} and device={device!r} disagree; pass one of them")
    return chosen if isinstance(chosen, (int, torch.device)) else str(chosen)


def _merge(settings: dict, extra: dict, defaults: dict, what: str) -> None:
    """Add ``extra`` to ``settings``: an argument left at its default gives way to ``extra``;
    an explicit argument and a different ``extra`` value conflict."""
    for key, value in extra.items():
        if key in settings and key in defaults and settings[key] != defaults[key] \
                and settings[key] != value:
            raise ValueError(f"{key} given twice: {settings[key]!r} as an argument of train() "
                             f"and {value!r} in {what}")
        settings[key] = value


def train_settings(args: dict, defaults: dict, plan_kwargs: dict | None,
                   datasplitter_kwargs: dict | None, kwargs: dict) -> dict:
    """The keyword arguments of :func:`pyro_totalvi.train.train` for ``TOTALVI.train``.

    ``args`` are ``TOTALVI.train``'s named arguments (with their ``defaults``); ``plan_kwargs``,
    ``datasplitter_kwargs`` and ``**kwargs`` are scvi-tools'. ``plan_kwargs`` values are used
    unless the same setting was passed to ``train`` explicitly (scvi-tools 1.4.2's ``TOTALVI``
    silently overwrites ``plan_kwargs["lr"]`` and the warm-up settings with ``train``'s
    defaults); contradicting values raise.
    """
    settings = dict(args)
    plan = dict(plan_kwargs or {})
    _refuse(set(plan) - set(PLAN_KEYS), PLAN_KEYS, "plan_kwargs")
    _merge(settings, plan, defaults, "plan_kwargs")
    split = dict(datasplitter_kwargs or {})
    _refuse(set(split) - set(SPLIT_KEYS) - set(LOADER_KEYS), SPLIT_KEYS + LOADER_KEYS,
            "datasplitter_kwargs")
    if split.pop("drop_last", False):
        raise ValueError("datasplitter_kwargs drop_last=True is not supported: a last "
                         "minibatch of fewer than 3 cells is always dropped, others are kept")
    loader = sorted(set(split) & set(LOADER_KEYS))
    if loader:
        warnings.warn(f"datasplitter_kwargs {loader} have no effect in pyro_totalvi "
                      "(minibatches are cut from the arrays without a torch DataLoader)",
                      UserWarning, stacklevel=3)
    _merge(settings, {k: v for k, v in split.items() if k in SPLIT_KEYS}, defaults,
           "datasplitter_kwargs")
    kwargs = dict(kwargs)
    for key in DISPLAY_KEYS:
        kwargs.pop(key, None)
    if "enable_progress_bar" in kwargs:
        settings["progress_bar"] = bool(kwargs.pop("enable_progress_bar"))
    accepted = set(PLAN_KEYS) | set(TRAINER_KEYS) | set(DISPLAY_KEYS) | set(defaults)
    _refuse(set(kwargs) - accepted, accepted, "train()")
    _merge(settings, kwargs, defaults, "train()")
    return settings
