"""Model inversion attacks on split-inference features: decoder-based and GAN-based."""
from reproduce.attacks.decoder import (
    AttackResult,
    DecoderAttackConfig,
    build_inversion_decoder,
    load_best_decoder,
    run_decoder_attack,
)
from reproduce.attacks.evaluate import evaluate_reconstruction, reconstruct
from reproduce.attacks.features import (
    FeatureSet,
    compute_features,
    defence_noise_sigma,
    gaussian_perturbation,
    make_perturbation,
    split_infer_time,
    split_train_val,
)
from reproduce.attacks.gan import GANAttackConfig, gradient_penalty, run_gan_attack

__all__ = [
    "AttackResult",
    "DecoderAttackConfig",
    "FeatureSet",
    "GANAttackConfig",
    "build_inversion_decoder",
    "compute_features",
    "defence_noise_sigma",
    "evaluate_reconstruction",
    "gaussian_perturbation",
    "gradient_penalty",
    "load_best_decoder",
    "make_perturbation",
    "reconstruct",
    "run_decoder_attack",
    "run_gan_attack",
    "split_infer_time",
    "split_train_val",
]
