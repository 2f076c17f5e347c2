"""Model inversion attacks on a trained run: ``python -m reproduce.attack --run RUN --attack decoder``.

Every attack is ``cem_fast.audit``'s (decoder, gan, whitebox, adaptive); this module feeds it the run's
encoder features and writes the records (file names: :mod:`reproduce.attacks.records`):
``RUN/attack_<name>.json`` (one entry per setting: metrics, learning curve, class histograms of the
attacker's and the scored images, wall time) and ``RUN/attack_<name>_samples.pt``. Per-epoch state
lives in ``RUN/attack_<name>/<setting>/`` and a rerun resumes from it. Settings:

* ``train_time``: the attack trains on the training split, is scored on the test split;
* ``infer_time``: it trains on 90% of the test split, is scored on the other 10% (a seeded split,
  stratified by class: the test file's order does not matter).

gan, adaptive and whitebox start from the decoder attack of the same setting and run it first if it
is missing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from cem_fast.audit import AdaptiveConfig, AuditPreset, DecoderConfig, GANConfig, LoopConfig, WhiteboxConfig
from cem_fast.audit.adaptive import AdaptiveAttack, noise_variance
from cem_fast.audit.data import (
    FeatureSet,
    Normalization,
    as_tensors,
    compute_features,
    stratified_split,
    stratified_subset,
)
from cem_fast.audit.decoder import DecoderAttack, bf16_autocast_available, load_decoder
from cem_fast.audit.gan import GANAttack
from cem_fast.audit.loop import BEST_NAME, CHECKPOINT_NAME, train_attack
from cem_fast.audit.whitebox import run_whitebox
from reproduce.attacks import SETTINGS, defence_noise_sigma, make_perturbation, write_setting
from reproduce.machine import default_device
from reproduce.rundir import RunDir

ATTACKS = ("decoder", "gan", "whitebox", "adaptive")
BF16_ATTACKS = ("decoder", "adaptive")  # the attacks that can train under bf16 autocast
PRESETS = ("smoke", "cpu", "cpu-full", "paper")
INFER_TIME_TEST_FRACTION = 0.1

# smoke: seconds. cpu: minutes per setting on 2 cores (the full decoder trains at about 250 images/s at 2
# threads there) over its whole cosine schedule, the epoch with the lowest held-out MSE kept: its held-out MSE
# swings by 10-15 % from epoch to epoch while the LR is high, and on the cpu-full lambda-0 record patience 3
# would have stopped the inference-time decoder at epoch 14 of 30, 27 % above its best (epoch 29).
# paper: the authors' schedule.
ATTACK_PRESETS = {
    # smoke's GAN batch is tiny so that its few images still make 10+ critic steps (>= 1 generator step).
    # Its decoder (and so the GAN's generator and the adaptive decoder) is cem_fast.audit's smoke size, 1 block
    # of 16 channels: a smoke run's files stay small (the full decoder's weights are 2.9 MB per setting).
    "smoke": AuditPreset(
        name="smoke",
        max_train_images=256,
        max_test_images=200,
        decoder=DecoderConfig(t_max=2, num_blocks=1, width=16),
        decoder_loop=LoopConfig(max_epochs=2, patience=2),
        gan=GANConfig(batch_size=4, t_max=4),
        gan_loop=LoopConfig(max_epochs=2, patience=2),
        adaptive=AdaptiveConfig(draws=2, t_max=2, num_blocks=1, width=16),
        adaptive_loop=LoopConfig(max_epochs=2, patience=2),
        whitebox=WhiteboxConfig(steps=20, n_images=16, batch_size=16),
    ),
    "cpu": AuditPreset(
        name="cpu",
        max_train_images=10_000,
        max_test_images=None,
        decoder=DecoderConfig(t_max=30),
        decoder_loop=LoopConfig(max_epochs=30, patience=None),
        gan=GANConfig(t_max=4),
        gan_loop=LoopConfig(max_epochs=2, patience=2),
        adaptive=AdaptiveConfig(draws=2, t_max=6),
        adaptive_loop=LoopConfig(max_epochs=6, patience=None),
        whitebox=WhiteboxConfig(steps=200, n_images=128),
    ),
    "paper": AuditPreset(
        name="paper",
        max_train_images=None,
        max_test_images=None,
        decoder=DecoderConfig(t_max=50),
        decoder_loop=LoopConfig(max_epochs=50, patience=None),
        gan=GANConfig(t_max=300),
        gan_loop=LoopConfig(max_epochs=150, patience=None),
        adaptive=AdaptiveConfig(draws=4, t_max=20),
        adaptive_loop=LoopConfig(max_epochs=20, patience=5),
        whitebox=WhiteboxConfig(steps=500, n_images=256),
    ),
}
# cpu-full: the cpu budgets; the attacker still trains on at most 10,000 images, so an attack costs what it costs
# in the cpu grid.
ATTACK_PRESETS["cpu-full"] = dataclasses.replace(ATTACK_PRESETS["cpu"], name="cpu-full")
PAPER_GAN_EPOCHS = {"tinyimagenet": 80}
# run_attack's overrides beyond AuditPreset.with_overrides' "section.field" keys
RUN_OPTIONS = (
    "epochs",
    "batch_size",
    "max_train_images",
    "max_test_images",
    "seed",
    "noise_aware",
    "bf16_autocast",
    "fresh",
    "progress",
)


def check_finished_run(run_dir) -> Path:
    """Return ``run_dir`` as a Path if it holds a finished live training run (not a committed record), else
    raise with the reason and the command that finishes it."""
    return RunDir(run_dir).check_attackable().path


def _setting_name(setting: str) -> str:
    name = str(setting).replace("-", "_")
    if name not in SETTINGS:
        raise ValueError(f"setting must be one of {', '.join(SETTINGS)} (or with a hyphen), got {setting!r}")
    return name


def resolve_preset(name: str, attack: str, dataset: str, overrides: dict) -> AuditPreset:
    """The preset's budgets with the run's overrides: ``epochs``/``batch_size`` apply to ``attack`` only."""
    preset = ATTACK_PRESETS[name]
    if name == "paper" and attack == "gan" and dataset in PAPER_GAN_EPOCHS:
        preset = preset.with_overrides({"gan_loop.max_epochs": PAPER_GAN_EPOCHS[dataset]})
    section = {"decoder": "decoder", "gan": "gan", "adaptive": "adaptive", "whitebox": "whitebox"}[attack]
    changes = {k: v for k, v in overrides.items() if k not in RUN_OPTIONS}
    for key in ("max_train_images", "max_test_images"):
        if overrides.get(key) is not None:
            changes[key] = overrides[key]
    epochs = overrides.get("epochs")
    if epochs is not None:
        if attack == "whitebox":
            changes["whitebox.steps"] = epochs
        else:
            changes[f"{section}_loop.max_epochs"] = epochs
            if attack != "gan":
                changes[f"{section}.t_max"] = epochs
            elif name != "paper":  # the paper's GAN schedule is 300 epochs long whatever the budget
                changes["gan.t_max"] = 2 * epochs
    if overrides.get("batch_size") is not None:
        changes[f"{section}.batch_size"] = overrides["batch_size"]
    if not isinstance(overrides.get("bf16_autocast", False), bool):
        raise TypeError(
            f"bf16_autocast must be a bool (run_attack also takes 'auto'), got {overrides['bf16_autocast']!r}"
        )
    if overrides.get("bf16_autocast"):
        if attack not in BF16_ATTACKS:
            raise ValueError(f"bf16_autocast applies to the decoder and adaptive attacks, not {attack!r}")
        changes[f"{section}.bf16_autocast"] = True
    seed = overrides.get("seed", 0)
    for loop in ("decoder_loop", "gan_loop", "adaptive_loop"):
        changes[f"{loop}.seed"] = seed
    return preset.with_overrides(changes)


def _labels(dataset) -> torch.Tensor:
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return torch.as_tensor(targets, dtype=torch.long)
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))], dtype=torch.long)


class _RunData:
    """The loaded run, plus its encoder features computed lazily once per split."""

    def __init__(
        self,
        run_dir: Path,
        device: torch.device,
        seed: int,
        preset: AuditPreset,
        data_root: Optional[str],
        progress: Optional[bool],
    ):
        from reproduce.data import dataset_info, load_dataset, subset
        from reproduce.runs import load_run

        self.device, self.seed, self.preset, self.progress = device, seed, preset, progress
        self.run = load_run(run_dir, device=str(device))
        self.dataset_name = self.run.dataset
        root = data_root if data_root is not None else self.run.data_root
        self._load = lambda split: load_dataset(self.dataset_name, split, data_root=root, augment=False)
        self._subset = subset
        info = dataset_info(self.dataset_name)
        self.normalization = Normalization(info.mean, info.std)
        self.num_classes = info.num_classes
        self._cache: dict = {}

    def features(self, split: str) -> tuple[FeatureSet, str]:
        """(FeatureSet, description) of the run's train or test data, limited by the preset.

        The run's own subset (``train_subset``/``test_subset`` of its config, same seed) is used, so a
        train-time attack sees exactly the images the model was trained on; the preset's limit is a
        seeded, class-stratified subset of it.
        """
        if split in self._cache:
            return self._cache[split]
        from torch.utils.data import Subset

        from reproduce.data import denormalize

        config = self.run.config
        dataset = self._load(split)
        info_name = getattr(getattr(dataset, "info", None), "name", self.dataset_name)
        indices = torch.arange(len(dataset))
        how = f"{split} split, all {len(dataset)} images"
        run_subset = config.get(f"{split}_subset")
        if run_subset is not None and run_subset < len(dataset):
            indices = torch.tensor(self._subset(dataset, run_subset, seed=config["seed"]).indices)
            how = f"the run's {split} subset ({run_subset} of {len(dataset)}, class-balanced, seed {config['seed']})"
        limit = self.preset.max_train_images if split == "train" else self.preset.max_test_images
        if limit is not None and limit < len(indices):
            indices = indices[stratified_subset(_labels(dataset)[indices], limit, self.seed)]
            how += f", a class-stratified {limit} of them (seed {self.seed})"
        x, y = as_tensors(Subset(dataset, indices.tolist()))
        feats = compute_features(
            self.run.model.encoder,
            denormalize(x, info_name),
            y,
            self.normalization,
            device=self.device,
            progress=self.progress,
            desc=f"encoder features ({split})",
        )
        self._cache[split] = (feats, how)
        return self._cache[split]

    def setting_data(self, setting: str) -> tuple[FeatureSet, FeatureSet, dict]:
        """Attack-training and attack-test FeatureSets of a setting, with a description."""
        if setting == "train_time":
            (train, train_how), (test, test_how) = self.features("train"), self.features("test")
            return train, test, {"attack_train": train_how, "attack_test": test_how}
        test, test_how = self.features("test")
        first, last = stratified_split(test.labels, INFER_TIME_TEST_FRACTION, self.seed)
        return (
            test.subset(first),
            test.subset(last),
            {
                "attack_train": f"a class-stratified 90% ({len(first)}, seed {self.seed}) of: {test_how}",
                "attack_test": f"the other 10% ({len(last)}) of: {test_how}",
            },
        )


def _run_description(loaded) -> dict:
    config = loaded.config
    return {
        "dataset": loaded.dataset,
        "run_sigma": loaded.sigma,
        "attack_noise_sigma": defence_noise_sigma(loaded.defence),
        "defence": config.get("defence"),
        "defence_options": config.get("defence_options"),
        "noise_on": config.get("noise_on"),
        "cem_lambda": config.get("cem_lambda"),
        "cem_variant": config.get("cem_variant"),
        "arch": config.get("arch"),
        "cut": config.get("cut"),
    }


def _protocol_notes(attack: str, noise_aware: bool, sigma: float) -> dict:
    notes = {
        "perturbation": (
            "defence.perturb (noise-aware: the defence's full perturbation)"
            if noise_aware
            else f"Gaussian noise only, sigma={sigma} (as the authors' attack)"
        ),
        "selection": "epoch with the lowest MSE on a seeded, class-stratified held-out part of the attack-training "
        "data, with patience and a max-epoch budget (config.patience, config.max_epochs)",
        "metrics": "per image on [0,1] images, then averaged; psnr_per_batch_authors = mean over "
        "evaluation batches of 10*log10(1/MSE_batch); SSIM 11x11 Gaussian, sigma 1.5",
        "evaluation_noise": "fixed seed (same noisy features every evaluation)",
    }
    if attack in ("gan", "adaptive"):
        notes["init"] = "the decoder attack's selected weights for the same setting (a candidate of the selection)"
    if attack == "whitebox":
        notes["selection"] = "none: a fixed number of Adam steps on a fixed class-stratified subset of the test data"
    return notes


@dataclasses.dataclass(frozen=True)
class _SettingJob:
    """Everything one attack setting of one run needs: the run's data, this setting's attack-training and
    test features, the perturbation, the resolved budgets and what the record's header says."""

    run_dir: Path
    setting: str
    data: _RunData
    train: object  # FeatureSet
    test: object  # FeatureSet
    how: dict
    perturb: object
    noise_sigma: Optional[float]
    noise_aware: bool
    preset: AuditPreset
    device: torch.device
    progress: Optional[bool]
    header: dict


def _decoder_for(job: _SettingJob) -> tuple:
    """The decoder attack's selected model of this setting, training (and recording) it first if missing.

    A decoder that is recorded but whose weights are gone (a run restored from a record keeps none) is
    retrained with its recorded settings, not the calling attack's preset, so that it is the recorded one."""
    folder = RunDir(job.run_dir).attack_state_dir("decoder", job.setting)
    if not (folder / BEST_NAME).exists():
        recorded = _runnable_here(RunDir(job.run_dir).attack_entry("decoder", job.setting).get("config"), job.device)
        _run_one("decoder", dataclasses.replace(job, preset=_with_recorded_decoder(job.preset, recorded)))
    model, saved = load_decoder(folder)
    return model, {"decoder_best_epoch": saved["best_epoch"], "decoder_protocol": saved["protocol"]}


def _runnable_here(recorded: Optional[dict], device) -> Optional[dict]:
    """A decoder record's config, in float32 if it trained under bf16 autocast and ``device`` has no bf16
    kernels (the two score within 0.5 % of each other: docs/audit.md)."""
    if recorded and recorded.get("bf16_autocast") and not bf16_autocast_available(device):
        print(
            "[attack] the recorded decoder trained under bf16 autocast, which this device has no kernels for: "
            "retraining it in float32",
            file=sys.stderr,
        )
        return {**recorded, "bf16_autocast": False}
    return recorded


def bf16_choice(run_dir, attack: str, setting: str, device) -> dict:
    """The overrides ``bf16_autocast="auto"`` stands for in one setting of ``attack``.

    Only the decoder and adaptive attacks train under bf16; the others get float32. An attack that has saved
    state keeps the choice it began with, so that it resumes. A new one trains under bf16 autocast where
    ``device`` has fast bf16 kernels, in float32 elsewhere. State saved under bf16 on a device without bf16
    kernels is discarded and the attack restarts in float32 (``fresh``)."""
    if attack not in BF16_ATTACKS:
        return {"bf16_autocast": False}
    available = bf16_autocast_available(device)
    folder = RunDir(run_dir).attack_state_dir(attack, _setting_name(setting))
    saved = next((folder / n for n in (CHECKPOINT_NAME, BEST_NAME) if (folder / n).is_file()), None)
    if saved is None:
        return {"bf16_autocast": available}
    began = bool(torch.load(saved, map_location="cpu", weights_only=True)["protocol"]["attack"].get("bf16_autocast"))
    if began and not available:
        print(
            f"[attack] {folder} was saved under bf16 autocast, which {device} cannot run: restarting in float32",
            file=sys.stderr,
        )
        return {"bf16_autocast": False, "fresh": True}
    return {"bf16_autocast": began}


def _with_recorded_decoder(preset: AuditPreset, recorded: Optional[dict]) -> AuditPreset:
    """``preset`` with its decoder and decoder-loop settings replaced by a decoder record's ``config``."""
    if not recorded:
        return preset
    changes = {}
    for section, cls in (("decoder", DecoderConfig), ("decoder_loop", LoopConfig)):
        changes.update({f"{section}.{f.name}": recorded[f.name] for f in dataclasses.fields(cls) if f.name in recorded})
    return preset.with_overrides(changes)


def _run_one(attack: str, job: _SettingJob) -> tuple:
    """Train (or resume) and score ``attack`` for ``job``, write its entry; returns (result, entry)."""
    preset, train, test, perturb = job.preset, job.train, job.test, job.perturb
    folder = RunDir(job.run_dir).attack_state_dir(attack, job.setting)
    common = dict(num_classes=job.data.num_classes, device=job.device, progress=job.progress)
    decoder, init_info = _decoder_for(job) if attack != "decoder" else (None, {})
    print(
        f"[attack] {attack} attack, {job.setting}: {len(train)} attack-training / {len(test)} test images",
        file=sys.stderr,
    )
    if attack == "decoder":
        result = train_attack(
            DecoderAttack(preset.decoder), train, test, perturb, preset.decoder_loop, state_dir=folder, **common
        )
    elif attack == "gan":
        result = train_attack(
            GANAttack(decoder, preset.gan, init_info=init_info),
            train,
            test,
            perturb,
            preset.gan_loop,
            state_dir=folder,
            **common,
        )
    elif attack == "adaptive":
        defence = job.data.run.defence
        own = defence.perturb if callable(getattr(defence, "perturb", None)) else perturb
        noise_var = noise_variance(
            own, job.noise_sigma if own is perturb else None, train, seed=preset.adaptive_loop.seed
        )
        attack_obj = AdaptiveAttack(
            preset.adaptive, num_classes=job.data.num_classes, noise_var=noise_var, init=decoder, init_info=init_info
        )
        result = train_attack(attack_obj, train, test, own, preset.adaptive_loop, state_dir=folder, **common)
    else:
        result = run_whitebox(
            job.data.run.model.encoder,
            test,
            perturb,
            preset.whitebox,
            sigma=job.noise_sigma,
            normalization=job.data.normalization,
            mean_image=train.images.mean(0),
            start_model=decoder,
            seed=preset.decoder_loop.seed,
            num_samples=preset.decoder_loop.num_samples,
            **common,
        )
    entry = {
        "preset": preset.name,
        **result.record(),
        "data": job.how,
        "protocol": _protocol_notes(attack, job.noise_aware or attack == "adaptive", job.noise_sigma),
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if init_info:
        entry["generator_init" if attack == "gan" else "init"] = {"decoder_best_epoch": init_info["decoder_best_epoch"]}
    samples = {
        "original": result.samples["original"].mul(255).round().to(torch.uint8),
        "reconstruction": result.samples["reconstruction"],
    }
    write_setting(job.run_dir, attack, {**job.header, "attack": attack}, job.setting, entry, samples)
    print(f"[attack] {attack} {job.setting}: MSE {entry['mse']:.5f} SSIM {entry['ssim']:.4f}", file=sys.stderr)
    return result, entry


def run_attack(
    run_dir,
    attack: str,
    *,
    setting: str = "train-time",
    preset: Optional[str] = None,
    data_root: Optional[str] = None,
    device: str = "cpu",
    overrides: Optional[dict] = None,
) -> dict:
    """Run ``attack`` (decoder, gan, whitebox, adaptive) on a finished run for one setting; return the entry
    it wrote into ``RUN/attack_<attack>.json`` under ``settings[setting]``.

    ``preset``: smoke, cpu or paper (default: the run's training preset). ``overrides``: ``epochs``,
    ``batch_size`` (of this attack), ``max_train_images``, ``max_test_images``, ``seed``, ``noise_aware``
    (the defence's full perturbation, not only its noise), ``bf16_autocast`` (decoder, adaptive: train
    under bf16 autocast; recorded in the entry's config; ``"auto"``: as :func:`bf16_choice` decides),
    ``fresh`` (discard this attack's saved state), ``progress``, or any ``"section.field"`` of :class:`cem_fast.audit.AuditPreset`.
    """
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {', '.join(ATTACKS)}, got {attack!r}")
    setting = _setting_name(setting)
    run_dir = check_finished_run(run_dir)
    overrides = dict(overrides or {})
    if overrides.get("bf16_autocast") == "auto":
        overrides.update(bf16_choice(run_dir, attack, setting, device))
    if preset is None:
        preset = _read_config(run_dir).get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    device = torch.device(device)
    seed, noise_aware = int(overrides.get("seed", 0)), bool(overrides.get("noise_aware", False))
    config = _read_config(run_dir)
    resolved = resolve_preset(preset, attack, config.get("dataset", ""), overrides)
    progress = overrides.get("progress")
    data = _RunData(run_dir, device, seed, resolved, data_root, progress)
    noise_sigma = defence_noise_sigma(data.run.defence)
    perturb = make_perturbation(data.run.defence, noise_aware=noise_aware, sigma=noise_sigma)
    header = {
        "run": str(run_dir.resolve()),
        "preset": preset,
        "device": str(device),
        "seed": seed,
        "noise_aware": noise_aware,
        **_run_description(data.run),
    }
    if overrides.get("fresh"):
        folder = RunDir(run_dir).attack_state_dir(attack, setting)
        if folder.exists():
            shutil.rmtree(folder)
    train, test, how = data.setting_data(setting)
    job = _SettingJob(
        run_dir=run_dir,
        setting=setting,
        data=data,
        train=train,
        test=test,
        how=how,
        perturb=perturb,
        noise_sigma=noise_sigma,
        noise_aware=noise_aware,
        preset=resolved,
        device=device,
        progress=progress,
        header=header,
    )
    return _run_one(attack, job)[1]


def _read_config(run_dir) -> dict:
    path = Path(run_dir) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reproduce.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run directory (from reproduce.train)")
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default=None,
        help="attack budget (epochs, image limits); default: the run's training preset",
    )
    parser.add_argument(
        "--setting",
        choices=SETTINGS + ("both", "train-time", "infer-time"),
        default=None,
        help="default: both for decoder, train_time for the others",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="this attack's epoch budget (whitebox: its steps), overriding the preset",
    )
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 (decoder), 128 (gan)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--noise-aware",
        action="store_true",
        help="feed the attack the defence's full perturbation (dropout, top-k, ...), "
        "not only its Gaussian noise (adaptive always does)",
    )
    parser.add_argument(
        "--bf16-autocast",
        nargs="?",
        const="on",
        default="off",
        choices=("on", "off", "auto"),
        help="decoder, adaptive: train under bf16 autocast with channels_last weights (needs bf16 kernels on "
        "a CPU: AVX-512 BF16 or AMX); weights, loss and scores stay float32. auto: where the device has the "
        "kernels, and a begun attack resumes as it began. Alone: on",
    )
    parser.add_argument("--max-train-images", type=int, default=None, help="override the preset's limit")
    parser.add_argument("--max-test-images", type=int, default=None, help="override the preset's limit")
    parser.add_argument("--data-root", default=None, help="default: the run's")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="discard this attack's saved state and start over (not the decoder others start from)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.setting is None:
        args.setting = "both" if args.attack == "decoder" else "train_time"
    if args.device is None:
        args.device = default_device()
    for name in ("epochs", "batch_size", "max_train_images", "max_test_images", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.bf16_autocast == "on" and args.attack not in BF16_ATTACKS:
        parser.error(f"--bf16-autocast applies to --attack decoder and adaptive, not {args.attack}")
    if args.bf16_autocast == "on" and not bf16_autocast_available(args.device):
        parser.error("--bf16-autocast: this CPU has no bf16 kernels in oneDNN (needs AVX-512 BF16 or AMX)")
    try:
        run_dir = check_finished_run(args.run)
        if args.preset is None:
            args.preset = _read_config(run_dir).get("preset", "paper")
            if args.preset not in PRESETS:
                parser.error(f"the run's preset {args.preset!r} is not one of {PRESETS}; pass --preset")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    overrides = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "max_train_images": args.max_train_images,
        "max_test_images": args.max_test_images,
        "seed": args.seed,
        "noise_aware": args.noise_aware,
        "bf16_autocast": {"on": True, "off": False}.get(args.bf16_autocast, args.bf16_autocast),
        "fresh": args.fresh,
        "progress": False if args.no_progress else None,
    }
    started = time.perf_counter()
    settings = SETTINGS if args.setting == "both" else (_setting_name(args.setting),)
    try:
        for setting in settings:
            entry = run_attack(
                run_dir,
                args.attack,
                setting=setting,
                preset=args.preset,
                data_root=args.data_root,
                device=args.device,
                overrides=overrides,
            )
            m = entry["metrics"]
            print(
                f"{args.attack} {setting}: MSE {m['mse']:.5f}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.4f}  "
                f"(authors' PSNR {m['psnr_per_batch_authors']:.2f}, best epoch {entry['best_epoch']}/{entry['epochs']})"
            )
    except KeyboardInterrupt:
        given = sys.argv[1:] if argv is None else list(argv)
        # the same command without --fresh, which would discard the epochs saved so far
        again = shlex.join(["python", "-m", "reproduce.attack", *(a for a in given if a != "--fresh")])
        print(
            f"error: interrupted; continue with `{again}` (finished settings are kept, the interrupted one resumes "
            f"from its last finished epoch)",
            file=sys.stderr,
        )
        return 130
    print(f"wrote {RunDir(run_dir).attack_record_path(args.attack)} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
