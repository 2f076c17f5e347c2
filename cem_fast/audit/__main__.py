"""``python -m cem_fast.audit --encoder MODULE:CALLABLE --data NAME|PATH --sigma S --out DIR``: audit an encoder.

Writes DIR/report.json, DIR/report.md and DIR/reconstructions.png. Every bad input ends the run with
one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import time
from pathlib import Path

import torch
from torch import nn

from .data import Normalization
from .datasets import CIFAR10_NORMALIZATION, load_named
from .ladder import ATTACKS, DEFAULT_ATTACKS, audit
from .presets import PRESETS


class UsageError(Exception):
    """A bad command-line input: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def _load_callable(spec: str, what: str):
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"{what} must be MODULE:CALLABLE (a module name or a .py file, then a name), got {spec!r}")
    if module_name.endswith(".py") or "/" in module_name:
        path = Path(module_name)
        if not path.is_file():
            raise UsageError(f"{what}: no such file {path}")
        mod_spec = importlib.util.spec_from_file_location(f"_audit_user_{path.stem}", path)
        module = importlib.util.module_from_spec(mod_spec)
        try:
            mod_spec.loader.exec_module(module)
        except Exception as err:  # the user's file: any error it raises is its own, reported in one line
            raise UsageError(f"{what}: importing {path} failed: {type(err).__name__}: {err}") from None
    else:
        if "" not in sys.path:
            sys.path.insert(0, "")
        try:
            module = importlib.import_module(module_name)
        except ImportError as err:
            raise UsageError(f"{what}: cannot import module {module_name!r} ({err})") from None
    target = getattr(module, attr, None)
    if target is None:
        raise UsageError(f"{what}: {module_name} has no attribute {attr!r}")
    model = target if isinstance(target, nn.Module) else target() if callable(target) else None
    if not isinstance(model, nn.Module):
        raise UsageError(f"{what}: {spec} must be an nn.Module or return one, got {type(model).__name__}")
    return model


def _load_weights(model: nn.Module, path: str) -> None:
    if not Path(path).is_file():
        raise UsageError(f"--weights: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # not a torch file, or pickled code: say so in one line
        raise UsageError(f"--weights: cannot read {path} as a state_dict ({type(err).__name__})") from None
    if not isinstance(state, dict):
        raise UsageError(f"--weights: {path} holds a {type(state).__name__}, not a state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).splitlines()[1:3])
        raise UsageError(f"--weights: {path} does not fit the encoder: {detail}") from None


def _floats(text: str, what: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise UsageError(f"{what} must be comma-separated numbers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m cem_fast.audit", description=__doc__.split("\n")[0])
    parser.add_argument("--encoder", required=True, help="MODULE:CALLABLE returning the encoder (module or .py file)")
    parser.add_argument("--weights", help="a state_dict file for the encoder")
    parser.add_argument("--data", required=True, help="cifar10-sample, an .npz file or an image folder")
    parser.add_argument("--sigma", required=True, type=float, help="std of the defence's Gaussian noise on z")
    parser.add_argument("--out", required=True, help="folder for report.json, report.md, reconstructions.png")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="smoke")
    parser.add_argument("--attacks", default=",".join(DEFAULT_ATTACKS), help=f"comma list of {', '.join(ATTACKS)}")
    parser.add_argument("--head", help="MODULE:CALLABLE returning the server head on z (reports task accuracy)")
    parser.add_argument("--head-weights", help="a state_dict file for the head")
    parser.add_argument(
        "--mean",
        help="the encoder's input normalisation, e.g. 0.5,0.5,0.5 (default: CIFAR-10's "
        "for cifar10-sample, none for files)",
    )
    parser.add_argument("--std", help="as --mean")
    parser.add_argument("--h-x", type=float, default=None, help="H(x) in nats for Theorem 1's floor")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not args.sigma >= 0:
        raise UsageError(f"--sigma must be >= 0, got {args.sigma}")
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    if not attacks or any(a not in ATTACKS for a in attacks):
        raise UsageError(f"--attacks must be a comma list of {', '.join(ATTACKS)}, got {args.attacks!r}")
    if (args.mean is None) != (args.std is None):
        raise UsageError("--mean and --std go together")
    if args.threads is not None:
        if args.threads <= 0:
            raise UsageError(f"--threads must be positive, got {args.threads}")
        torch.set_num_threads(args.threads)
    encoder = _load_callable(args.encoder, "--encoder")
    if args.weights:
        _load_weights(encoder, args.weights)
    head = _load_callable(args.head, "--head") if args.head else None
    if args.head_weights:
        if head is None:
            raise UsageError("--head-weights needs --head")
        _load_weights(head, args.head_weights)
    try:
        data = load_named(args.data)
    except FileNotFoundError as err:
        raise UsageError(str(err)) from None
    if args.mean is not None:
        norm = Normalization(_floats(args.mean, "--mean"), _floats(args.std, "--std"))
    else:
        norm = CIFAR10_NORMALIZATION if args.data == "cifar10-sample" else None
    # load_named gives [0, 1] images; the encoder sees them normalised, as audit() expects its data.
    prepared = {
        split: (x if norm is None else norm.normalize(x), y)
        for split, (x, y) in ((s, data[s]) for s in ("train", "test") if s in data)
    }
    started = time.perf_counter()
    report = audit(
        encoder,
        prepared["train"],
        test_data=prepared.get("test"),
        sigma=args.sigma,
        normalization=norm,
        head=head,
        attacks=attacks,
        preset=args.preset,
        h_x=args.h_x,
        seed=args.seed,
        device=args.device,
        progress=False if args.no_progress else None,
        log=lambda msg: print(f"[audit] {msg}", file=sys.stderr),
    )
    paths = report.write(args.out)
    w = report.worst
    print(
        f"worst case: MSE {w['mse']:.4f} ({w['mse_attack']}), SSIM {w['ssim']:.3f} ({w['ssim_attack']}); "
        f"wrote {paths['json']}, {paths['markdown'].name}, {paths['figure'].name} in "
        f"{time.perf_counter() - started:.0f} s"
    )
    return 0


def main(argv=None) -> int:
    try:
        return run(argv)
    except KeyboardInterrupt:
        print(
            "error: interrupted before the report was written; rerun the same command (an audit starts over)",
            file=sys.stderr,
        )
        return 130
    except (UsageError, ValueError, TypeError, FileNotFoundError) as err:
        message = " ".join(str(err).split())
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
