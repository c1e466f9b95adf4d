"""seka-lightning: prompt highlighting for LLMs by spectral key steering (SEKA / AdaSEKA)."""

__version__ = "0.1.0"

from seka_lightning.bank import ProjectionBank
from seka_lightning.highlight import encode_highlighted, encode_spans
from seka_lightning.models import load_model
from seka_lightning.steering import steer

__all__ = ["ProjectionBank", "__version__", "encode_highlighted", "encode_spans", "load_model", "steer"]
