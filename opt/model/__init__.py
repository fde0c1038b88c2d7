"""The OPT architecture in pure torch, its presets, and conversion to and from Hugging Face."""

from opt.model.config import PRESETS, OPTConfig
from opt.model.model import OPT

__all__ = ["OPT", "OPTConfig", "PRESETS"]
