"""seka-lightning: prompt highlighting for LLMs by spectral key steering (SEKA / AdaSEKA)."""

__version__ = "0.1.0"

from seka_lightning.bank import ProjectionBank
from seka_lightning.build import BankStatistics, build_bank, build_statistics
from seka_lightning.generate import generate_highlighted
from seka_lightning.highlight import encode_highlighted, encode_spans
from seka_lightning.models import load_model
from seka_lightning.steering import steer

__all__ = [
    "BankStatistics",
    "ProjectionBank",
    "__version__",
    "build_bank",
    "build_statistics",
    "encode_highlighted",
    "encode_spans",
    "generate_highlighted",
    "load_model",
    "steer",
]
