"""The attacks on a trained run: the defence's perturbation and the record files (the attacks: ``cem_fast.audit``)."""

from reproduce.attacks.features import defence_noise_sigma, make_perturbation
from reproduce.attacks.records import SETTINGS, read_record, write_setting

__all__ = [
    "SETTINGS",
    "defence_noise_sigma",
    "make_perturbation",
    "read_record",
    "write_setting",
]
