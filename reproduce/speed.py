"""The trainer's speed options: channels_last, bf16 autocast of the conv stacks, torch.compile.

Each is a setting of ``config.json`` (``channels_last``, ``bf16_autocast``, ``compile``; all off by
default) and a flag of ``python -m reproduce.train``. Measurements: ``docs/presets.md``.

* ``channels_last``: the model's conv weights and each input batch in ``torch.channels_last``. The
  encoder hands ``z`` on in the default (NCHW) layout, so the noise drawn for it, the defences and CEM
  see exactly what they see without the option (the loss agrees with float32's to rounding).
* ``bf16_autocast``: ``torch.autocast(device, bfloat16)`` (CPU or CUDA) around the encoder's cut layers
  (``encoder.layers``) and the server's feature stack (``server.features``), in training mode only.
  Both return float32: the bottleneck conv and the Sigmoid that make ``z`` run in float32, so ``z``,
  the noise, CEM, the classifier and the loss stay float32. Evaluation (and every attack, which loads
  the float32 weights) runs in float32. The trainer also hands the option to the defence's setup, so a
  simulated attacker's decoder (ResSFL, Noise_ARL, PATROL) trains under it too. Needs oneDNN's bf16
  kernels (AVX-512 BF16 or AMX) on the CPU, or a CUDA GPU with bf16. On a GPU it keeps a run's precision
  that of the CPU runs that trained under it (a grid's arms compare like with like).
* ``compile``: ``nn.Module.compile()`` (inductor) of the encoder and of the server, in place, so the
  ``state_dict`` keys and the checkpoints stay those of the uncompiled model. The first step compiles.
  Not with PATROL (its pruning re-shapes the encoder) nor under torchrun.

``apply_speed_options(model, cfg, device)`` installs them; ``to_batch_format(x, cfg)`` puts a batch
in the model's layout. The checkpoint format does not change: ``nchw_state`` saves the weights in the
default layout, and a state_dict loads into a model of either layout.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

SPEED_OPTIONS = ("channels_last", "bf16_autocast", "compile")


def bf16_supported(device_type: str = "cpu") -> bool:
    """Whether ``device_type`` has bf16 kernels: oneDNN's on the CPU (AVX-512 BF16 or AMX), or a GPU that
    torch says supports bf16 on CUDA."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    from cem_fast.audit.decoder import bf16_autocast_available

    return bf16_autocast_available("cpu")


def check_speed_options(cfg: dict) -> None:
    """ValueError naming the flag when an option cannot run with ``cfg`` (device, defence, CPU)."""
    for key in SPEED_OPTIONS:
        if not isinstance(cfg.get(key, False), bool):
            raise TypeError(f"{key} must be a bool, got {cfg[key]!r}")
    device = torch.device(cfg.get("device", "cpu"))
    if cfg.get("bf16_autocast"):
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--bf16-autocast runs on a CPU or a CUDA GPU; the device is {device}")
        if not bf16_supported(device.type):
            raise ValueError(
                "--bf16-autocast: no CUDA GPU with bf16 support is visible; train without it"
                if device.type == "cuda"
                else "--bf16-autocast: this CPU has no bf16 support in oneDNN (needs AVX-512 BF16 or AMX; "
                "torch.ops.mkldnn._is_mkldnn_bf16_supported() is False); train without it"
            )
        if cfg.get("dtype", "float32") != "float32":
            raise ValueError(f"--bf16-autocast needs --dtype float32, got {cfg['dtype']}")
    if cfg.get("compile") and cfg.get("defence") == "patrol":
        raise ValueError("--compile does not apply to --defense patrol (its pruning re-shapes the encoder)")


class _Bf16Autocast(nn.Sequential):
    """``nn.Sequential`` whose training-mode forward runs under bf16 autocast (on the input's device: CPU or
    CUDA) and returns float32."""

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = super().forward(x)
        return out.float()


class _NCHWOutput(nn.Sequential):
    """``nn.Sequential`` whose output is contiguous in the default layout (the encoder's ``z``)."""

    def forward(self, x):
        return super().forward(x).contiguous()


def _as(cls, seq: nn.Sequential) -> nn.Sequential:
    """``seq``'s children (shared, same names: same state_dict keys) in a ``cls`` container."""
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential, got {type(seq).__name__}")
    out = cls(OrderedDict(seq.named_children()))
    out.train(seq.training)
    return out


def use_channels_last(model: nn.Module) -> None:
    """Conv weights of ``model`` in ``torch.channels_last`` (again after a pruning or resize made new ones)."""
    model.to(memory_format=torch.channels_last)


def apply_speed_options(model: nn.Module, cfg: dict) -> nn.Module:
    """Install ``cfg``'s speed options on a split model (in place; returns it).

    It replaces ``model.encoder`` (channels_last) and containers inside it (bf16), keeping every
    module and state_dict key: call it before anything holds on to ``model.encoder`` (the defence's
    setup), and ``use_channels_last`` again after loading or pruning made new weights.
    """
    check_speed_options(cfg)
    if cfg.get("bf16_autocast") and not isinstance(model.encoder.layers, _Bf16Autocast):
        model.encoder.layers = _as(_Bf16Autocast, model.encoder.layers)
        model.server.features = _as(_Bf16Autocast, model.server.features)
    if cfg.get("channels_last"):
        if not isinstance(model.encoder, _NCHWOutput):
            model.encoder = _as(_NCHWOutput, model.encoder)
        use_channels_last(model)
    if cfg.get("compile"):
        model.encoder.compile()
        model.server.compile()
    return model


def to_batch_format(x: torch.Tensor, cfg: dict) -> torch.Tensor:
    """An input batch in the model's memory layout (``channels_last`` when that option is on)."""
    if cfg.get("channels_last") and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def nchw_state(state: dict) -> dict:
    """A state_dict with every tensor contiguous in the default layout (the same tensors where they are)."""
    out = OrderedDict((k, v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in state.items())
    if hasattr(state, "_metadata"):  # the modules' versions, which load_state_dict reads
        out._metadata = state._metadata
    return out
