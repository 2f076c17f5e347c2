"""``audit()``: run the attack ladder on an encoder and put the worst case beside the theory's bound."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .adaptive import AdaptiveAttack, fit_cluster_prior, noise_variance
from .data import (
    FeatureSet,
    Normalization,
    as_tensors,
    check_labels,
    class_counts,
    compute_features,
    make_perturbation,
    stratified_split,
    stratified_subset,
    to_unit_range,
)
from .decoder import DecoderAttack
from .gan import GANAttack
from .loop import AttackResult, eval_seed, reconstruct, seeded, train_attack
from .presets import AuditPreset, get_preset
from .report import AuditReport, theory_section
from .whitebox import run_whitebox

__all__ = ["ATTACKS", "DEFAULT_ATTACKS", "audit", "prepare_data", "run_ladder"]

ATTACKS = ("decoder", "whitebox", "adaptive", "gan")
DEFAULT_ATTACKS = ("decoder", "whitebox", "adaptive")


def _check_attacks(attacks) -> tuple:
    if isinstance(attacks, str):
        attacks = tuple(a.strip() for a in attacks.split(",") if a.strip())
    attacks = tuple(attacks)
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise ValueError(f"attacks must be a non-empty list of {', '.join(ATTACKS)}; got {list(attacks)}")
    return attacks


def _images(data, normalization, what: str) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    x, y = as_tensors(data)
    if x.dim() != 4 or not x.is_floating_point() and x.dtype != torch.uint8:
        raise ValueError(f"{what} must hold images [N, C, H, W], got {x.dtype} of shape {list(x.shape)}")
    x = x.float().div_(255.0) if x.dtype == torch.uint8 else x
    try:
        return to_unit_range(x, normalization), y
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def prepare_data(
    encoder: nn.Module,
    data,
    test_data=None,
    *,
    normalization=None,
    preset: AuditPreset,
    test_fraction: float = 0.1,
    seed: int = 0,
    device="cpu",
    progress: Optional[bool] = None,
) -> tuple[FeatureSet, FeatureSet, int, dict]:
    """The attacker's and the scored feature sets (stratified, seeded), the number of classes and a description."""
    normalization = Normalization.coerce(normalization)
    x, y = _images(data, normalization, "data")
    y, k = check_labels(y, len(x))
    how = {"data": f"{len(x)} images"}
    if test_data is None:
        train_idx, test_idx = stratified_split(y, test_fraction, seed)
        xt, yt = x[test_idx], y[test_idx]
        x, y = x[train_idx], y[train_idx]
        how["split"] = f"stratified {1 - test_fraction:.0%} / {test_fraction:.0%} split (seed {seed})"
    else:
        xt, yt = _images(test_data, normalization, "test_data")
        yt, kt = check_labels(yt, len(xt))
        k = max(k, kt)
        how["split"] = f"separate test data ({len(xt)} images)"
    if x.shape[1:] != xt.shape[1:]:
        raise ValueError(f"data and test_data images differ in shape: {list(x.shape[1:])} vs {list(xt.shape[1:])}")
    for name, limit in (("train", preset.max_train_images), ("test", preset.max_test_images)):
        if limit is not None:
            keep = stratified_subset(y if name == "train" else yt, limit, seed)
            if name == "train":
                x, y = x[keep], y[keep]
            else:
                xt, yt = xt[keep], yt[keep]
    how["attacker_images"], how["scored_images"] = len(x), len(xt)
    train = compute_features(
        encoder, x, y, normalization, device=device, progress=progress, desc="encoder features (attacker)"
    )
    test = compute_features(
        encoder, xt, yt, normalization, device=device, progress=progress, desc="encoder features (scored)"
    )
    return train, test, k, how


def run_ladder(
    attacks: Sequence[str],
    train: FeatureSet,
    test: FeatureSet,
    perturb,
    sigma: Optional[float],
    *,
    encoder: Optional[nn.Module],
    normalization,
    preset: AuditPreset,
    num_classes: int,
    seed: int = 0,
    device="cpu",
    state_dir=None,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = lambda msg: None,
) -> dict:
    """Run ``attacks`` in ladder order -> ``{name: AttackResult}``; the decoder first where another starts from it."""
    attacks = _check_attacks(attacks)
    loops = {
        name: dataclasses.replace(getattr(preset, f"{name}_loop"), seed=seed) for name in ("decoder", "adaptive", "gan")
    }
    common = dict(num_classes=num_classes, device=device, progress=progress)
    folder = (lambda name: Path(state_dir) / name) if state_dir is not None else (lambda name: None)
    results: dict[str, AttackResult] = {}
    needs_decoder = any(a in attacks for a in ("decoder", "adaptive", "gan")) or (
        "whitebox" in attacks and preset.whitebox.start == "decoder"
    )
    if needs_decoder:
        log(f"decoder attack: {len(train)} attacker images, {len(test)} scored")
        results["decoder"] = train_attack(
            DecoderAttack(preset.decoder), train, test, perturb, loops["decoder"], state_dir=folder("decoder"), **common
        )
    decoder = results.get("decoder")
    init_info = {"decoder_best_epoch": decoder.best_epoch} if decoder else {}
    for name in attacks:
        if name == "whitebox":
            if encoder is None:
                raise ValueError("the whitebox attack needs the encoder")
            log(f"whitebox attack: {preset.whitebox.n_images} scored images, {preset.whitebox.steps} steps")
            results[name] = run_whitebox(
                encoder,
                test,
                perturb,
                preset.whitebox,
                sigma=sigma,
                normalization=normalization,
                mean_image=train.images.mean(0),
                start_model=decoder.model if decoder else None,
                seed=seed,
                num_samples=preset.display_images,
                **common,
            )
        elif name == "adaptive":
            log("adaptive attack")
            attack = AdaptiveAttack(
                preset.adaptive,
                num_classes=int(train.labels.max()) + 1,
                noise_var=noise_variance(perturb, sigma, train, seed),
                init=decoder.model,
                init_info=init_info,
            )
            results[name] = train_attack(
                attack, train, test, perturb, loops["adaptive"], state_dir=folder("adaptive"), **common
            )
        elif name == "gan":
            log("GAN attack")
            results[name] = train_attack(
                GANAttack(decoder.model, preset.gan, init_info=init_info),
                train,
                test,
                perturb,
                loops["gan"],
                state_dir=folder("gan"),
                **common,
            )
    return {name: results[name] for name in ATTACKS if name in results}


@torch.no_grad()
def _task_accuracy(head: nn.Module, test: FeatureSet, perturb, seed: int, device) -> dict:
    was_training = head.training
    head.eval()
    correct_noisy = correct_clean = 0
    try:
        with seeded(eval_seed(seed) + 2, device):
            for start in range(0, len(test), 256):
                z = test.features[start : start + 256].to(device)
                labels = test.labels[start : start + 256].to(device)
                correct_clean += (head(z).argmax(1) == labels).sum().item()
                correct_noisy += (head(perturb(z)).argmax(1) == labels).sum().item()
    finally:
        head.train(was_training)
    return {"accuracy": correct_noisy / len(test), "accuracy_clean_features": correct_clean / len(test), "n": len(test)}


def audit(
    encoder: nn.Module,
    data,
    *,
    sigma=0.0,
    normalization=None,
    head: Optional[nn.Module] = None,
    attacks: Sequence[str] = DEFAULT_ATTACKS,
    preset="smoke",
    test_data=None,
    test_fraction: float = 0.1,
    h_x: Optional[float] = None,
    seed: int = 0,
    device="cpu",
    overrides: Optional[dict] = None,
    state_dir=None,
    progress: Optional[bool] = None,
    log: Callable[[str], None] = lambda msg: None,
) -> AuditReport:
    """Audit how much ``encoder``'s features leak: the attack ladder, its worst case, and the theory beside it.

    ``data``: images as a tensor, an ``(x, y)`` pair, a Dataset yielding ``x`` or ``(x, y, ...)``, or a
    DataLoader, normalised with ``normalization=(mean, std)`` (None: already in [0, 1]); without
    ``test_data`` a stratified ``test_fraction`` of it is scored. ``sigma``: the defence's Gaussian noise
    std, or any callable applied to ``z``. ``head``: the server's model on ``z``, for the task accuracy.
    ``h_x``: H(x) in nats for Theorem 1's floor. ``preset``: ``"smoke"``, ``"standard"`` or an AuditPreset.
    """
    if not isinstance(encoder, nn.Module):
        raise TypeError(f"encoder must be an nn.Module, got {type(encoder).__name__}")
    if head is not None and not isinstance(head, nn.Module):
        raise TypeError(f"head must be None or an nn.Module, got {type(head).__name__}")
    attacks = _check_attacks(attacks)
    perturb, sigma_value = make_perturbation(sigma)
    preset = get_preset(preset).with_overrides(overrides)
    normalization = Normalization.coerce(normalization)
    device = torch.device(device)
    encoder = encoder.to(device)
    started = time.perf_counter()
    train, test, k, how = prepare_data(
        encoder,
        data,
        test_data,
        normalization=normalization,
        preset=preset,
        test_fraction=test_fraction,
        seed=seed,
        device=device,
        progress=progress,
    )
    results = run_ladder(
        attacks,
        train,
        test,
        perturb,
        sigma_value,
        encoder=encoder,
        normalization=normalization,
        preset=preset,
        num_classes=k,
        seed=seed,
        device=device,
        state_dir=state_dir,
        progress=progress,
        log=log,
    )
    accuracy = _task_accuracy(head.to(device), test, perturb, seed, device) if head is not None else None
    bound_rows = stratified_subset(train.labels, preset.bound_images, seed)
    theory = theory_section(
        train.features[bound_rows],
        train.labels[bound_rows],
        int(train.labels.max()) + 1,
        sigma_value,
        d=int(torch.tensor(train.image_shape).prod()),
        h_x=h_x,
        clusters_per_class=preset.clusters_per_class,
        fit=fit_cluster_prior,
    )
    display = _display(results, test, perturb, preset.display_images, seed, device)
    setup = {
        "preset": preset.name,
        "sigma": sigma_value if sigma_value is not None else "callable",
        "seed": seed,
        "attacks_requested": list(attacks),
        "feature_shape": list(train.feature_shape),
        "image_shape": list(train.image_shape),
        "num_classes": k,
        "device": str(device),
        "train_class_counts": class_counts(train.labels, k),
        "scored_class_counts": class_counts(test.labels, k),
        **how,
        "wall_time_s": time.perf_counter() - started,
    }
    return AuditReport(
        results=results, requested=attacks, setup=setup, theory=theory, accuracy=accuracy, display=display
    )


def _display(results: dict, test: FeatureSet, perturb, n: int, seed: int, device) -> dict:
    """The same ``n`` test images for every attack: the first of the whitebox subset (or of the test set)."""
    white = results.get("whitebox")
    idx = torch.tensor(white.extra["scored_indices"][:n]) if white else torch.arange(min(n, len(test)))
    shown = test.subset(idx)
    rows = {"original": shown.images}
    for name, result in results.items():
        if result.model is None:
            rows[name] = result.samples["reconstruction"][: len(idx)]
        else:
            rows[name] = reconstruct(
                result.model, shown, perturb, batch_size=256, device=device, noise_seed=eval_seed(seed) + 3
            )
    return rows
