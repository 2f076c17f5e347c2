"""Train a split model with a defence and (optionally) CEM: Algorithm 1 of the paper.

    python -m reproduce.train --preset cpu --data-root ../shared/data --defense noise_nopeek \
        --cem-lambda 16 --out runs/nn_cem

One step (top to bottom)::

    z       = encoder(x)                          # clean smashed data
    defence.adversary_step(x01, z.detach())       # ResSFL/PATROL: train the simulated attacker
    logits  = server(defence.perturb(z))          # the server sees the perturbed features
    loss    = CE + defence.regularizer(x, z, y) + lambda_eff * cem(z, y)
    loss.backward(); client_opt.step(); server_opt.step()

CEM is built only when ``--cem-lambda > 0``. Its clusters are refit at each epoch end from the
clean features the epoch already computed (``--cem-refit extra-pass``: the authors' extra eval
pass); in epoch 1 there are none yet and the term is zero.

Where things are: the flags and the preset -> config step in ``reproduce.train_config`` (the presets
and schedules themselves in ``reproduce.presets`` / ``reproduce.schedules``), one epoch in
``reproduce.train_loop``, the datasets and loaders in ``reproduce.train_data``, torchrun's data
parallelism in ``reproduce.ddp``, the run directory's files in ``reproduce.rundir``. This file: the run
(optimisers, resume, the epoch loop, checkpoints) and the command line.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.utils.data import DataLoader, Subset

from reproduce.checkpoint import load_checkpoint, save_atomic
from reproduce.data import denormalize
from reproduce.ddp import Dist, Net
from reproduce.rundir import RunDir
from reproduce.runs import build_model, build_run_defence, load_model_state, setup_defence
from reproduce.schedules import LRFactor, cem_weight
from reproduce.speed import apply_speed_options, nchw_state, use_channels_last
from reproduce.train_config import build_parser, check_resume_config, resolve_config, resume_config
from reproduce.train_data import load_data, pretrain_loader, train_loader
from reproduce.train_loop import (
    build_cem,
    check_collapse,
    collect_features,
    evaluate,
    repoint_client_optimizer,
    rng_state,
    seed_everything,
    set_rng_state,
    show_progress,
    train_epoch,
)

__all__ = ["run", "main", "build_parser", "resolve_config"]


# ----------------------------------------------------------------------------- the run


def _refit_features(model, train_ds, feats, labels, sampler, cfg, dist_ctx: Dist, device):
    """The clean features and labels the epoch-end refit uses, every rank's, in the 1-process order."""
    if cfg["cem_refit"] == "extra-pass":
        # Under DDP each rank encodes a contiguous part; gathered in rank order = dataset order.
        n = len(train_ds)
        part = range(dist_ctx.rank * n // dist_ctx.world, (dist_ctx.rank + 1) * n // dist_ctx.world)
        extra = DataLoader(Subset(train_ds, part) if dist_ctx.enabled else train_ds, batch_size=cfg["eval_batch_size"])
        f_all, y_all = collect_features(model, extra, device)
        return dist_ctx.gather_rows(f_all), dist_ctx.gather_rows(y_all)
    f_all, y_all = torch.cat(feats), torch.cat(labels)
    if dist_ctx.enabled:  # every rank's features, in the 1-process epoch order (k-means++ depends on it)
        pos = dist_ctx.gather_rows(torch.tensor(sampler.positions, dtype=torch.int64, device=device))
        order = torch.argsort(pos)
        f_all, y_all = dist_ctx.gather_rows(f_all)[order], dist_ctx.gather_rows(y_all)[order]
    return f_all, y_all


def _start_state(rd: RunDir, resume: bool, device, log) -> Optional[dict]:
    """The checkpoint to resume from (None: start fresh); FileExistsError for a fresh start over a run."""
    if not resume:
        if rd.occupied:
            raise FileExistsError(
                f"{rd.path} already holds a run: continue it with `{rd.resume_command()}`, or choose another --out"
            )
        return None
    if rd.checkpoint_path.is_file():
        return load_checkpoint(rd.checkpoint_path, map_location=device)
    if not rd.started:
        raise FileNotFoundError(f"--resume: no run in {rd.path} (no {rd.CONFIG})")
    log(f"--resume: {rd.path} has no {rd.CHECKPOINT} yet (stopped before the end of epoch 1); starting it over")
    return None


def run(
    cfg: dict,
    out: str | os.PathLike,
    *,
    resume: bool = False,
    stop_after_epoch: Optional[int] = None,
    on_epoch_end: Optional[Callable[[int, dict], None]] = None,
    log: Callable[[str], None] = print,
    download: bool = False,
) -> list[dict]:
    """Train as ``cfg`` says into run directory ``out``; returns the per-epoch metrics.

    ``resume`` continues the run in ``out`` (a finished run is returned as it is); ``stop_after_epoch``
    stops right after that epoch's checkpoint (a simulated kill); ``on_epoch_end(epoch, row)`` is called
    after each checkpoint; ``download`` lets torchvision fetch a missing CIFAR set. Under torchrun
    (WORLD_SIZE > 1) it trains data-parallel (DDP; gloo on CPU) and only rank 0 writes files.
    """
    rd = RunDir(out)
    device = torch.device(cfg["device"])
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    rd.check_live("resumed or trained")
    if resume and rd.finished:
        log(f"{rd.path} has finished training; nothing to resume")
        return rd.metrics()
    dist_ctx = Dist(device)
    if not dist_ctx.main:
        log = lambda *_: None  # noqa: E731
    state = _start_state(rd, resume, device, log)
    dist_ctx.barrier()

    seed_everything(cfg["seed"])
    train_ds, plain_ds, test_ds = load_data(cfg, download)
    cfg["train_size"], cfg["test_size"] = len(train_ds), len(test_ds)
    cfg["world_size"] = dist_ctx.world
    dtype = getattr(torch, cfg.get("dtype", "float32"))
    if dist_ctx.enabled and cfg.get("compile"):
        raise ValueError("--compile is not supported under torchrun; train with --compile in one process")
    model = apply_speed_options(build_model(cfg).to(device, dtype), cfg)  # before the defence holds the encoder
    defence = build_run_defence(cfg).to(device, dtype)
    if dist_ctx.enabled and (defence.needs_unit_images or defence.extra_client_layer):
        raise ValueError(
            f"--defense {cfg['defence']} (a simulated attacker / pruning) is not supported under "
            "torchrun; train it in one process"
        )
    setup_defence(defence, model, cfg, device)
    cfg["defence_resolved"] = defence.describe()
    if resume:
        check_resume_config(rd.read_config(), cfg)
    elif dist_ctx.main:
        rd.write_config(cfg)
    if state is not None:
        load_model_state(model, state["model"])  # may resize a pruned encoder first
        if cfg.get("channels_last"):
            use_channels_last(model)  # the resized layers' new weights
        defence.load_state_dict(state["defence"])
    net = Net(model, dist_ctx, device)

    def model_state():  # in the default layout whatever the run's (checkpoints as without channels_last)
        return nchw_state(model.state_dict()) if cfg.get("channels_last") else model.state_dict()

    def sgd(params):
        return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=cfg["weight_decay"])

    opts = {"client": sgd(model.encoder.parameters()), "server": sgd(model.server.parameters())}
    factor = LRFactor(cfg["lr_schedule"], cfg["epochs"], cfg["authors_warmup_bug"])
    scheds = {k: torch.optim.lr_scheduler.LambdaLR(o, factor) for k, o in opts.items()}
    gen = torch.Generator().manual_seed(cfg["seed"])
    loader, sampler, per_epoch = train_loader(train_ds, cfg, dist_ctx, device, gen)
    cem = build_cem(cfg, per_epoch, device, process_group=dist_ctx.group)
    test_loader = DataLoader(test_ds, batch_size=cfg["eval_batch_size"], shuffle=False, num_workers=cfg["workers"])
    metrics: list[dict] = []
    start = 1
    if state is not None:
        for k in opts:
            opts[k].load_state_dict(state["optimizers"][k])
            scheds[k].load_state_dict(state["schedulers"][k])
        if cem is not None:
            cem.load_state_dict(state["cem"])
        gen.set_state(state["loader_generator"])
        if len(state["rng"]) != dist_ctx.world:
            raise ValueError(f"the checkpoint was written by {len(state['rng'])} process(es), not {dist_ctx.world}")
        set_rng_state(state["rng"][dist_ctx.rank])
        metrics = list(state["metrics"])
        start = state["epoch"] + 1
        if dist_ctx.main:
            rd.write_metrics(metrics)  # drop lines of an epoch that never reached its checkpoint
        log(f"resuming {rd.path} at epoch {start}/{cfg['epochs']}")
    else:
        if dist_ctx.main:
            rd.write_metrics([])
        if dist_ctx.enabled:
            torch.manual_seed(cfg["seed"] + 7919 * dist_ctx.rank)  # per-rank noise / augmentation streams
        pre_loader = pretrain_loader(defence, cfg, plain_ds)
        if pre_loader is not None:
            logs = defence.pretrain(
                model.encoder,
                pre_loader,
                device=device,
                progress=show_progress(cfg),
                denormalize=lambda x: denormalize(x, cfg["dataset"]),
            )
            if logs:
                log(f"defence pretraining: {logs}")

    for epoch in range(start, cfg["epochs"] + 1):
        t0 = time.time()
        if defence.on_epoch_start(epoch, model, opts):
            if cfg.get("channels_last"):
                use_channels_last(model)  # the pruned layers' new weights
            repoint_client_optimizer(opts["client"], model.encoder)
            log(
                f"epoch {epoch}: {cfg['defence']} changed the encoder "
                f"({sum(p.numel() for p in model.encoder.parameters())} parameters now)"
            )
        lr_client = opts["client"].param_groups[0]["lr"]
        lr_server = opts["server"].param_groups[0]["lr"]
        lam_eff = cem_weight(cfg["cem_schedule"], cfg["cem_lambda"], lr_server) if cem is not None else 0.0
        row, feats, labels = train_epoch(epoch, net, defence, cem, loader, opts, cfg, device, lam_eff, dist_ctx)
        if cem is not None:
            f_all, y_all = _refit_features(model, train_ds, feats, labels, sampler, cfg, dist_ctx, device)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # our own collapse check below says it once
                cem.refit(f_all, y_all, gather=False)  # under DDP the features are already every rank's
            del feats, labels, f_all, y_all
        row["test_acc"] = evaluate(model, defence, test_loader, device)
        for sch in scheds.values():
            sch.step()
        row = {
            "epoch": epoch,
            **row,
            "lr": lr_client,
            "lr_server": lr_server,
            "lambda_eff": lam_eff,
            "cem_fitted": bool(cem is not None and cem.fitted),
            "time_s": time.time() - t0,
        }
        metrics.append(row)
        rng = dist_ctx.gather_objects(rng_state())
        if dist_ctx.main:
            rd.append_metrics(row)
            # What --resume needs, once: the config and the metrics live in their own files.
            save_atomic(
                {
                    "epoch": epoch,
                    "model": model_state(),
                    "optimizers": {k: o.state_dict() for k, o in opts.items()},
                    "schedulers": {k: sch.state_dict() for k, sch in scheds.items()},
                    "cem": None if cem is None else cem.state_dict(),
                    "defence": defence.state_dict(),
                    "rng": rng,
                    "loader_generator": gen.get_state(),
                    "metrics": metrics,
                },
                rd.checkpoint_path,
            )
        dist_ctx.barrier()
        cem_txt = f" cem {row['cem']:.4f} (x{lam_eff:g})" if "cem" in row else ""
        log(
            f"epoch {epoch}/{cfg['epochs']}: loss {row['loss']:.4f} ce {row['ce']:.4f}{cem_txt} "
            f"train acc {row['train_acc']:.3f} test acc {row['test_acc']:.3f} lr {lr_client:.3g} "
            f"feat var {row['feature_var']:.3g} ({row['time_s']:.1f}s)"
        )
        if dist_ctx.main:
            check_collapse(row, cfg)
        if on_epoch_end is not None:
            on_epoch_end(epoch, row)
        if stop_after_epoch is not None and epoch >= stop_after_epoch and epoch < cfg["epochs"]:
            log(f"stopping after epoch {epoch} (--stop-after-epoch); continue with `{rd.resume_command()}`")
            return metrics

    if dist_ctx.main:
        save_atomic(
            {
                "model": model_state(),
                "defence": defence.state_dict(),
                "cem": None if cem is None else cem.state_dict(),
                "metrics": metrics,
                "config": cfg,
                "epoch": cfg["epochs"],
            },
            rd.final_path,
        )
        rd.checkpoint_path.unlink(missing_ok=True)  # a finished run resumes nothing: final.pt is all it needs
    dist_ctx.barrier()
    log(f"done: {rd.final_path}")
    return metrics


# ----------------------------------------------------------------------------- CLI


def _fail(message: str, code: int) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def main(argv: Optional[list[str]] = None) -> int:
    """CLI entry point (``python -m reproduce.train``); returns the exit status (130 after Ctrl-C)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    rd = RunDir(args.out)
    if args.data_root is not None and not Path(args.data_root).expanduser().is_dir():
        return _fail(f"--data-root {args.data_root} is not a folder (no datasets there; nothing downloaded)", 2)
    try:
        rd.check_live("resumed or trained")
    except ValueError as err:
        return _fail(f"--out {args.out}: {err}", 2)
    stored = None
    if args.resume:
        if not rd.started:
            parser.error(f"--resume: no run in {args.out} (no {rd.CONFIG}); start it without --resume")
        stored = rd.read_config()
        if args.preset is None:
            args.preset = stored.get("preset")
    elif rd.occupied:
        return _fail(
            f"{args.out} already holds a run: continue it with `{rd.resume_command()}`, or choose another --out", 2
        )
    try:
        cfg = resolve_config(args)
        cfg["command"] = " ".join(["python -m reproduce.train", *argv])
        if stored is not None:
            cfg = resume_config(stored, cfg, args)
    except ValueError as e:
        parser.error(str(e))
    try:
        run(cfg, args.out, resume=args.resume, stop_after_epoch=args.stop_after_epoch, download=args.download)
    except KeyboardInterrupt:
        done = len(rd.metrics())
        return _fail(f"interrupted after {done} finished epoch(s); continue with `{rd.resume_command()}`", 130)
    except FileNotFoundError as e:  # the data is missing: the loader says where to get it
        return _fail(str(e), 1)
    except ValueError as e:  # settings that only the data or the process count can refute
        parser.error(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
