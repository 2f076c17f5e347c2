"""Model inversion attacks on a trained run: ``python -m reproduce.attack --run RUN --attack decoder``.

Writes ``RUN/attack_<name>.json`` (metrics per setting, protocol, wall time) and
``RUN/attack_<name>_samples.pt`` (a few test originals and reconstructions for
figures). Per-epoch state lives in ``RUN/attack_<name>/<setting>/`` and a rerun
resumes from it. Settings (facts §4a):

* ``train_time``: the attack trains on the training split, is scored on the test split;
* ``infer_time``: it trains on the first 90% of the test split, is scored on the last 10%.

The GAN attack starts from the decoder attack of the same setting and runs
that first if it is missing.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from reproduce.attacks import (
    DecoderAttackConfig,
    FeatureSet,
    GANAttackConfig,
    compute_features,
    defence_noise_sigma,
    load_best_decoder,
    make_perturbation,
    run_decoder_attack,
    run_gan_attack,
    split_infer_time,
)
from reproduce.checkpoint import save_atomic, write_json_atomic

ATTACKS = ("decoder", "gan")
SETTINGS = ("train_time", "infer_time")
PRESETS = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class AttackPreset:
    """Attack budget of one preset. ``None`` image limits mean the whole split."""

    decoder_epochs: int
    gan_epochs: int
    gan_t_max: Optional[int]  # None: 2 x epochs (the paper's 300 for 150 epochs)
    max_train_images: Optional[int]
    max_test_images: Optional[int]
    gan_batch_size: Optional[int] = None  # None: the authors' 128


# smoke: seconds. cpu: a few minutes per setting on 2 cores (the full decoder
# trains at roughly 170 images/s there). paper: the authors' schedule.
ATTACK_PRESETS = {
    # smoke's GAN batch is tiny so that its few images still make 10+ critic steps (>= 1 generator step).
    "smoke": AttackPreset(decoder_epochs=2, gan_epochs=2, gan_t_max=None, max_train_images=256, max_test_images=200,
                          gan_batch_size=4),
    "cpu": AttackPreset(decoder_epochs=4, gan_epochs=2, gan_t_max=None, max_train_images=10_000, max_test_images=None),
    "paper": AttackPreset(decoder_epochs=50, gan_epochs=150, gan_t_max=300, max_train_images=None, max_test_images=None),
}
PAPER_GAN_EPOCHS = {"tinyimagenet": 80}


def check_finished_run(run_dir: str | os.PathLike) -> Path:
    """Return ``run_dir`` as a Path if it holds a finished training run, else raise with the reason."""
    path = Path(run_dir)
    if not path.exists():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if not path.is_dir():
        raise NotADirectoryError(f"run {path} is not a directory")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a run directory: it has no config.json")
    if not (path / "final.pt").is_file():
        raise ValueError(
            f"run {path} has not finished training (no final.pt); finish it with "
            f"`python -m reproduce.train` (it resumes) before attacking it"
        )
    return path


def _read_json(path: Path) -> dict:
    if not path.exists():
        return {}
    with open(path) as f:
        return json.load(f)


class _RunData:
    """The loaded run, plus its encoder features computed lazily once per split."""

    def __init__(self, run_dir: Path, device: torch.device, seed: int,
                 max_train: Optional[int], max_test: Optional[int], progress: bool):
        from reproduce.data import denormalize, load_dataset, subset
        from reproduce.runs import load_run

        self.run_dir, self.device, self.seed, self.progress = run_dir, device, seed, progress
        self.run = load_run(run_dir, device=str(device))
        self.dataset_name = self.run.dataset
        self._load_dataset = lambda split: load_dataset(self.dataset_name, split, data_root=self.run.data_root,
                                                        augment=False)
        self._denormalize = denormalize
        self._subset = subset
        self.max_train, self.max_test = max_train, max_test
        self._cache: dict[str, tuple[FeatureSet, str]] = {}

    def features(self, split: str) -> tuple[FeatureSet, str]:
        """(FeatureSet, description) of the run's train or test data, limited by the preset.

        The run's own subset (``train_subset``/``test_subset`` of its config, same seed) is
        used, so a train-time attack sees exactly the images the model was trained on.
        """
        if split in self._cache:
            return self._cache[split]
        from torch.utils.data import Subset

        config = self.run.config
        dataset = self._load_dataset(split)
        info_name = getattr(getattr(dataset, "info", None), "name", self.dataset_name)
        indices = list(range(len(dataset)))
        how = f"{split} split, all {len(dataset)} images"
        run_subset = config.get(f"{split}_subset")
        if run_subset is not None and run_subset < len(dataset):
            indices = list(self._subset(dataset, run_subset, seed=config["seed"]).indices)
            how = f"the run's {split} subset ({run_subset} of {len(dataset)}, class-balanced, seed {config['seed']})"
        limit = self.max_train if split == "train" else self.max_test
        if limit is not None and limit < len(indices):
            if split == "train":
                chosen = self._subset(Subset(dataset, indices), limit, seed=self.seed).indices
                indices = [indices[i] for i in chosen]
                how += f", class-balanced {limit} of them (seed {self.seed})"
            else:
                indices = indices[:limit]
                how += f", the first {limit} of them"
        feats = compute_features(
            self.run.model.encoder, dataset, lambda x: self._denormalize(x, info_name),
            indices=indices, device=self.device, progress=self.progress, desc=f"encoder features ({split})",
        )
        self._cache[split] = (feats, how)
        return self._cache[split]

    def setting_data(self, setting: str) -> tuple[FeatureSet, FeatureSet, dict]:
        """Attack-training and attack-test FeatureSets of a setting, with a description."""
        if setting == "train_time":
            (train, train_how), (test, test_how) = self.features("train"), self.features("test")
            return train, test, {"attack_train": train_how, "attack_test": test_how}
        test, test_how = self.features("test")
        first, last = split_infer_time(len(test))
        return test.subset(first), test.subset(last), {
            "attack_train": f"first 90% ({len(first)}) of: {test_how}",
            "attack_test": f"last 10% ({len(last)}) of: {test_how}",
        }


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


def _resolve_configs(args, dataset: str) -> tuple[DecoderAttackConfig, Optional[GANAttackConfig]]:
    preset = ATTACK_PRESETS[args.preset]
    dec_kwargs = {"epochs": preset.decoder_epochs, "seed": args.seed}
    if args.attack == "decoder":
        if args.epochs is not None:
            dec_kwargs["epochs"] = args.epochs
        if args.batch_size is not None:
            dec_kwargs["batch_size"] = args.batch_size
    decoder_config = DecoderAttackConfig(**dec_kwargs)
    if args.attack != "gan":
        return decoder_config, None
    epochs = preset.gan_epochs
    if args.preset == "paper":
        epochs = PAPER_GAN_EPOCHS.get(dataset, epochs)
    if args.epochs is not None:
        epochs = args.epochs
    gan_kwargs = {"epochs": epochs, "seed": args.seed,
                  "t_max": preset.gan_t_max if preset.gan_t_max is not None else 2 * epochs}
    if preset.gan_batch_size is not None:
        gan_kwargs["batch_size"] = preset.gan_batch_size
    if args.batch_size is not None:
        gan_kwargs["batch_size"] = args.batch_size
    return decoder_config, GANAttackConfig(**gan_kwargs)


def _protocol_notes(attack: str, noise_aware: bool, sigma: float) -> dict:
    notes = {
        "perturbation": ("defence.perturb (noise-aware: the defence's full perturbation)" if noise_aware
                         else f"Gaussian noise only, sigma={sigma} (as the authors' attack)"),
        "selection": "epoch with the lowest MSE on a seeded held-out part of the attack-training data",
        "metrics": "per image on [0,1] images, then averaged; psnr_per_batch_authors = mean over "
                   "evaluation batches of 10*log10(1/MSE_batch); SSIM 11x11 Gaussian, sigma 1.5",
        "evaluation_noise": "fixed seed (same noisy features every evaluation)",
    }
    if attack == "gan":
        notes["generator_init"] = "the decoder attack's selected weights for the same setting"
    return notes


def _write_outputs(run_dir: Path, attack: str, header: dict, setting: str, entry: dict, samples: dict) -> Path:
    json_path = run_dir / f"attack_{attack}.json"
    report = _read_json(json_path)
    report.update(header)
    report.setdefault("settings", {})[setting] = entry
    write_json_atomic(report, json_path)

    samples_path = run_dir / f"attack_{attack}_samples.pt"
    saved = torch.load(samples_path, map_location="cpu", weights_only=True) if samples_path.exists() else {}
    saved.update({k: v for k, v in header.items() if k != "settings"})
    saved.setdefault("settings", {})[setting] = samples
    save_atomic(saved, samples_path)
    return json_path


def _entry(result, config, preset_name: str, notes: dict, data_how: dict, extra: Optional[dict] = None) -> dict:
    return {
        "preset": preset_name,
        "metrics": result.test_metrics,
        "val_metrics": result.val_metrics,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs,
        "sizes": result.sizes,
        "data": data_how,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(config).items()},
        "protocol": notes,
        "history": result.history,
        "wall_time_s": result.wall_time_s,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        **(extra or {}),
    }


def attack_run(args) -> dict:
    """Run ``args.attack`` on ``args.run`` for the requested settings; return the JSON report."""
    run_dir = check_finished_run(args.run)
    device = torch.device(args.device)
    preset = ATTACK_PRESETS[args.preset]
    max_train = args.max_train_images if args.max_train_images is not None else preset.max_train_images
    max_test = args.max_test_images if args.max_test_images is not None else preset.max_test_images
    data = _RunData(run_dir, device, args.seed, max_train, max_test, progress=not args.no_progress)
    loaded = data.run
    decoder_config, gan_config = _resolve_configs(args, data.dataset_name)
    noise_sigma = defence_noise_sigma(loaded.defence)
    perturb = make_perturbation(loaded.defence, noise_aware=args.noise_aware, sigma=noise_sigma)
    settings = SETTINGS if args.setting == "both" else (args.setting,)
    header = {"run": str(run_dir.resolve()), "preset": args.preset, "device": str(device),
              "seed": args.seed, "noise_aware": args.noise_aware, **_run_description(loaded)}

    for setting in settings:
        train, test, how = data.setting_data(setting)
        dec_dir = run_dir / "attack_decoder" / setting
        if args.attack == "decoder" or not (dec_dir / "decoder_best.pt").exists():
            if args.fresh and dec_dir.exists() and args.attack == "decoder":
                shutil.rmtree(dec_dir)
            print(f"[attack] decoder attack, {setting}: {len(train)} attack-training / {len(test)} test images",
                  file=sys.stderr)
            result = run_decoder_attack(train, test, perturb, decoder_config, device=device,
                                        state_dir=dec_dir, progress=not args.no_progress)
            notes = _protocol_notes("decoder", args.noise_aware, noise_sigma)
            _write_outputs(run_dir, "decoder", {**header, "attack": "decoder"}, setting,
                           _entry(result, decoder_config, args.preset, notes, how), result.samples)
            print(f"[attack] decoder {setting}: {json.dumps(result.test_metrics)}", file=sys.stderr)
        if args.attack != "gan":
            continue
        gan_dir = run_dir / "attack_gan" / setting
        if args.fresh and gan_dir.exists():
            shutil.rmtree(gan_dir)
        generator, saved = load_best_decoder(dec_dir)
        if saved["protocol"]["config"] != dataclasses.asdict(decoder_config):
            print(f"[attack] note: the GAN starts from the decoder saved in {dec_dir}, trained with "
                  f"{saved['protocol']['config']} (not this preset's decoder settings)", file=sys.stderr)
        init_info = {"decoder_best_epoch": saved["best_epoch"], "decoder_protocol": saved["protocol"]}
        print(f"[attack] GAN attack, {setting}: {len(train)} attack-training / {len(test)} test images",
              file=sys.stderr)
        result = run_gan_attack(train, test, perturb, generator, gan_config, device=device, state_dir=gan_dir,
                                progress=not args.no_progress, init_info=init_info)
        notes = _protocol_notes("gan", args.noise_aware, noise_sigma)
        _write_outputs(run_dir, "gan", {**header, "attack": "gan"}, setting,
                       _entry(result, gan_config, args.preset, notes, how,
                              {"generator_init": {"decoder_best_epoch": saved["best_epoch"]}, **result.extra}),
                       result.samples)
        print(f"[attack] gan {setting}: {json.dumps(result.test_metrics)}", file=sys.stderr)
    return _read_json(run_dir / f"attack_{args.attack}.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m reproduce.attack", description=__doc__.split("\n")[0])
    parser.add_argument("--run", required=True, help="a finished run directory (from reproduce.train)")
    parser.add_argument("--attack", required=True, choices=ATTACKS)
    parser.add_argument("--preset", choices=PRESETS, default=None,
                        help="attack budget (epochs, image limits); default: the run's training preset")
    parser.add_argument("--setting", choices=SETTINGS + ("both",), default=None,
                        help="default: both for decoder, train_time for gan")
    parser.add_argument("--epochs", type=int, default=None, help="override the preset's epochs of this attack")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 256 (decoder), 128 (gan)")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--noise-aware", action="store_true",
                        help="feed the attack the defence's full perturbation (dropout, top-k, ...), "
                             "not only its Gaussian noise")
    parser.add_argument("--max-train-images", type=int, default=None, help="override the preset's limit")
    parser.add_argument("--max-test-images", type=int, default=None, help="override the preset's limit")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--fresh", action="store_true", help="discard this attack's saved state and start over (gan: not the decoder it starts from)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.setting is None:
        args.setting = "both" if args.attack == "decoder" else "train_time"
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    for name in ("epochs", "batch_size", "max_train_images", "max_test_images", "threads"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    try:
        run_dir = check_finished_run(args.run)
        if args.preset is None:
            args.preset = _read_json(run_dir / "config.json").get("preset", "paper")
            if args.preset not in PRESETS:
                parser.error(f"the run's preset {args.preset!r} is not one of {PRESETS}; pass --preset")
    except (OSError, ValueError) as err:
        parser.error(str(err))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    report = attack_run(args)
    for setting, entry in report.get("settings", {}).items():
        m = entry["metrics"]
        print(f"{args.attack} {setting}: MSE {m['mse']:.5f}  PSNR {m['psnr']:.2f}  SSIM {m['ssim']:.4f}  "
              f"(authors' PSNR {m['psnr_per_batch_authors']:.2f}, best epoch {entry['best_epoch']}/{entry['epochs']})")
    print(f"wrote {Path(args.run) / f'attack_{args.attack}.json'} in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())


def run_attack(run_dir, attack: str, *, setting: str = "train-time", preset: Optional[str] = None,
               data_root=None, device: str = "cpu", overrides: Optional[dict] = None) -> dict:
    """Run ``attack`` on the finished run ``run_dir`` in ``setting``; returns that setting's record entry.

    ``preset``: the attack budget (default: the run's training preset). ``overrides``: ``epochs``,
    ``batch_size``, ``seed`` (default 0), ``noise_aware``, ``max_train_images``, ``max_test_images``,
    ``fresh``. This code reads the data from the run's own ``data_root``; another one is refused.
    """
    from reproduce.rundir import RunDir, setting_key

    rd = RunDir(run_dir).check_finished()
    config = rd.read_config()
    if data_root is not None and str(Path(data_root).expanduser().resolve()) != config.get("data_root"):
        raise ValueError(f"data_root {data_root} differs from the run's ({config.get('data_root')})")
    if attack not in ATTACKS:
        raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
    key = setting_key(setting)
    if key not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS} (or with '-'), got {setting!r}")
    preset = preset or config.get("preset", "paper")
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    options = {"epochs": None, "batch_size": None, "seed": 0, "noise_aware": False, "max_train_images": None,
               "max_test_images": None, "fresh": False}
    unknown = sorted(set(overrides or {}) - set(options))
    if unknown:
        raise ValueError(f"overrides: {unknown} are not attack settings (known: {sorted(options)})")
    options.update(overrides or {})
    args = argparse.Namespace(run=str(rd.path), attack=attack, preset=preset, setting=key, device=str(device),
                              threads=None, no_progress=not sys.stderr.isatty(), **options)
    attack_run(args)
    return rd.attack_entry(attack, key)
