"""Spectral Momentum Integration (SMI): frequency-domain gradient filtering for optax."""

from smi_optax._src.smi import AdaptiveBlend
from smi_optax._src.smi import DEFAULT_MIN_SIZE
from smi_optax._src.smi import SMIState
from smi_optax._src.smi import adaptive_blend
from smi_optax._src.smi import smi
from smi_optax._src.smi import smi_adamw
from smi_optax._src.stats import stats
from smi_optax._src.views import SpectralView

__version__ = "0.1.0"

__all__ = (
    "AdaptiveBlend",
    "DEFAULT_MIN_SIZE",
    "SMIState",
    "SpectralView",
    "adaptive_blend",
    "smi",
    "smi_adamw",
    "stats",
)
