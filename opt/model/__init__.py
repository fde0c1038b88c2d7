"""The OPT architecture in pure torch, its presets, and conversion to and from Hugging Face.

`OPT` (which needs torch) is loaded on first use, so reading configs and presets stays fast.
"""

from typing import TYPE_CHECKING, Any

from opt.model.config import PRESETS, OPTConfig

if TYPE_CHECKING:
    from opt.model.model import OPT

__all__ = ["OPT", "OPTConfig", "PRESETS"]


def __getattr__(name: str) -> Any:
    if name == "OPT":
        from opt.model.model import OPT

        return OPT
    raise AttributeError(f"module 'opt.model' has no attribute {name!r}")
