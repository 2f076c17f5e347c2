"""The CEM variants, one file each: ``paper`` (Eq. 5-7), ``official`` and ``official-trained`` (the authors' code).

``get_variant(name, **options)`` builds one; ``VARIANTS`` lists their names. ``base.Variant`` says what a
variant provides (defaults, options, state, refit rule, math on the per-cluster statistics, C++ code).
"""

from .base import DEFAULT_VARIANT, LossParams, Variant, get_variant, group_counts, names, num_present, variant_type
from .official import OFFICIAL_EPS, Official
from .official_trained import (
    TRAINED_GAMMA,
    TRAINED_LAMBDA_CAP,
    TRAINED_LAMBDA_SCALE,
    TRAINED_LINEAR_EPS,
    OfficialTrained,
    index_bug_rows,
    trained_diag,
    trained_threshold,
)
from .paper import Paper, paper_diag, paper_full

VARIANTS = names()  # ("paper", "official", "official-trained")

__all__ = [
    "VARIANTS",
    "DEFAULT_VARIANT",
    "LossParams",
    "Variant",
    "get_variant",
    "variant_type",
    "Paper",
    "Official",
    "OfficialTrained",
    "group_counts",
    "num_present",
    "paper_diag",
    "paper_full",
    "trained_diag",
    "trained_threshold",
    "index_bug_rows",
    "OFFICIAL_EPS",
    "TRAINED_GAMMA",
    "TRAINED_LAMBDA_CAP",
    "TRAINED_LAMBDA_SCALE",
    "TRAINED_LINEAR_EPS",
]
