"""``cem_fast.audit``: measure how much an encoder's features leak, with a ladder of inversion attacks.

``audit(encoder, data, sigma=..., normalization=...)`` runs ``decoder``, ``whitebox`` and ``adaptive``
(and ``gan`` on request) and returns an :class:`AuditReport` (``.write(DIR)``: report.json, report.md,
reconstructions.png). ``python -m cem_fast.audit --help`` is the same from the command line. Needs the
``audit`` extra (torchmetrics, matplotlib, tqdm, pillow), imported only where used.
"""

from .adaptive import AdaptiveAttack, AdaptiveConfig
from .data import FeatureSet, Normalization, compute_features, gaussian_perturbation, stratified_split
from .decoder import DecoderAttack, DecoderConfig
from .gan import GANAttack, GANConfig
from .ladder import ATTACKS, DEFAULT_ATTACKS, audit, prepare_data, run_ladder
from .loop import AttackResult, LoopConfig, TrainedAttack, train_attack
from .presets import PRESETS, AuditPreset
from .report import AuditReport
from .whitebox import WhiteboxConfig, run_whitebox

__all__ = [
    "ATTACKS",
    "DEFAULT_ATTACKS",
    "PRESETS",
    "AdaptiveAttack",
    "AdaptiveConfig",
    "AttackResult",
    "AuditPreset",
    "AuditReport",
    "DecoderAttack",
    "DecoderConfig",
    "FeatureSet",
    "GANAttack",
    "GANConfig",
    "LoopConfig",
    "Normalization",
    "TrainedAttack",
    "WhiteboxConfig",
    "audit",
    "compute_features",
    "gaussian_perturbation",
    "prepare_data",
    "run_ladder",
    "run_whitebox",
    "stratified_split",
    "train_attack",
]
