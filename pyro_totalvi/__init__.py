"""pyro_totalvi: totalVI (CITE-seq RNA + protein) as explicit Pyro code."""

from .api import TOTALVI
from .data import TotalVIDataError
from .distributions import NegativeBinomial, NegativeBinomialMixture
from .labels import TotalANVIModule
from .model import TotalVIModule
from .simulate import simulate
from .totalanvi import TOTALANVI
from .train import TrainingDivergedError

__version__ = "0.1.0"

__all__ = [
    "TOTALVI",
    "TOTALANVI",
    "TotalVIModule",
    "TotalANVIModule",
    "NegativeBinomial",
    "NegativeBinomialMixture",
    "TotalVIDataError",
    "TrainingDivergedError",
    "simulate",
]
