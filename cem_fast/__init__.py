"""cem_fast: conditional entropy maximisation (CEM) against model-inversion attacks on split inference."""

from .functional import cem_loss
from .loss import CEMLoss, feature_spread
from .schedules import official_cem_weight
from .theory import entropy_bound, mse_lower_bound
from .variants import VARIANTS

__all__ = [
    "CEMLoss",
    "cem_loss",
    "entropy_bound",
    "mse_lower_bound",
    "official_cem_weight",
    "feature_spread",
    "VARIANTS",
]
__version__ = "0.1.0"
