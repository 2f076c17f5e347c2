"""The bottleneck at the cut: a few convs on the client, their mirror on the server.

Option grammar (the authors' ``--bottleneck_option``): ``[noRELU|norelu|noReLU][_][K<k>]C<c>[S<s>]``.

* ``C<c>``: channels of the smashed data.
* ``K<k>``: kernel of the stride-1 convs (odd, default 3).
* ``S<s>``: spatial down-sampling factor, a power of two (default 1). For ``s >= 2`` the client
  uses ``log2(s)`` stride-2 3x3 convs and the server the matching stride-2 transposed convs.
* ``noRELU``: no ReLU after the convs of either side (the paper's ``noRELU_C8S1``).

``"none"`` means no bottleneck: the smashed data is the cut layer's output itself.
Unlike the authors' parser, a string that does not parse raises ``ValueError`` instead of
silently falling back to ``C8S1`` with ReLU.

The helpers at the end assemble either side of a cut (shared by the VGG and ResNet builders).
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import nn

_PATTERN = re.compile(r"^(?:(?P<norelu>noRELU|norelu|noReLU)_?)?(?:K(?P<k>\d+))?C(?P<c>\d+)(?:S(?P<s>\d+))?$")


@dataclass(frozen=True)
class BottleneckSpec:
    """Parsed bottleneck option; ``channels is None`` means no bottleneck."""

    channels: int | None
    kernel: int = 3
    stride: int = 1
    relu: bool = True


def parse_bottleneck(option: str) -> BottleneckSpec:
    """Parse a bottleneck option string (see module docstring); ValueError if it does not parse."""
    if not isinstance(option, str):
        raise TypeError(f"bottleneck must be a str, got {type(option).__name__}")
    if option.lower() == "none":
        return BottleneckSpec(channels=None)
    m = _PATTERN.match(option)
    if m is None:
        raise ValueError(
            f"bottleneck={option!r} does not parse; expected '[noRELU_][K<k>]C<c>[S<s>]' "
            "(e.g. 'noRELU_C8S1', 'C8S2', 'K5C16S1') or 'none'"
        )
    channels = int(m["c"])
    kernel = int(m["k"]) if m["k"] else 3
    stride = int(m["s"]) if m["s"] else 1
    if channels < 1:
        raise ValueError(f"bottleneck={option!r}: channel count must be >= 1")
    if kernel < 1 or kernel % 2 == 0:
        raise ValueError(f"bottleneck={option!r}: kernel must be odd (keeps the spatial size)")
    if stride < 1 or stride & (stride - 1):
        raise ValueError(f"bottleneck={option!r}: stride must be a power of two")
    return BottleneckSpec(channels=channels, kernel=kernel, stride=stride, relu=m["norelu"] is None)


def _maybe_relu(layers: list[nn.Module], relu: bool) -> None:
    if relu:
        layers.append(nn.ReLU(inplace=True))


def bottleneck_client(spec: BottleneckSpec, in_channels: int) -> nn.Sequential:
    """Client half: ``in_channels -> spec.channels``, spatial size divided by ``spec.stride``."""
    layers: list[nn.Module] = []
    if spec.channels is None:
        return nn.Sequential()
    if spec.stride == 1:
        layers.append(nn.Conv2d(in_channels, spec.channels, spec.kernel, padding=spec.kernel // 2))
        _maybe_relu(layers, spec.relu)
        return nn.Sequential(*layers)
    c = in_channels
    for _ in range(int(math.log2(spec.stride))):
        layers.append(nn.Conv2d(c, spec.channels, 3, stride=2, padding=1))
        _maybe_relu(layers, spec.relu)
        c = spec.channels
    return nn.Sequential(*layers)


def bottleneck_server(spec: BottleneckSpec, out_channels: int) -> nn.Sequential:
    """Server half: ``spec.channels -> out_channels``, spatial size multiplied by ``spec.stride``."""
    layers: list[nn.Module] = []
    if spec.channels is None:
        return nn.Sequential()
    if spec.stride == 1:
        layers.append(nn.Conv2d(spec.channels, out_channels, spec.kernel, padding=spec.kernel // 2))
        _maybe_relu(layers, spec.relu)
        return nn.Sequential(*layers)
    n = int(math.log2(spec.stride))
    for i in range(n):
        c_out = out_channels if i == n - 1 else spec.channels
        layers.append(nn.ConvTranspose2d(spec.channels, c_out, 3, stride=2, padding=1, output_padding=1))
        _maybe_relu(layers, spec.relu)
    return nn.Sequential(*layers)


def make_encoder(layers: list[nn.Module], spec: BottleneckSpec, cut_channels: int, sigmoid: bool) -> nn.Sequential:
    """Client = cut layers -> bottleneck client half -> Sigmoid (``sigmoid``) or BatchNorm."""
    smashed_channels = cut_channels if spec.channels is None else spec.channels
    head = nn.Sigmoid() if sigmoid else nn.BatchNorm2d(smashed_channels)
    return nn.Sequential(
        OrderedDict(
            layers=nn.Sequential(*layers),
            bottleneck=bottleneck_client(spec, cut_channels),
            head=head,
        )
    )


def make_server_features(layers: list[nn.Module], spec: BottleneckSpec, cut_channels: int) -> nn.Sequential:
    """Server feature extractor = bottleneck server half -> remaining layers."""
    return nn.Sequential(
        OrderedDict(
            bottleneck=bottleneck_server(spec, cut_channels),
            layers=nn.Sequential(*layers),
        )
    )


@torch.no_grad()
def probe_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Output shape (without batch) of ``module`` on a zero input of ``shape`` (eval mode, restored)."""
    was_training = module.training
    module.eval()
    try:
        out = module(torch.zeros(1, *shape))
    finally:
        module.train(was_training)
    return tuple(out.shape[1:])


def check_stride(spec: BottleneckSpec, cut_shape: tuple[int, ...]) -> None:
    """The server's transposed convs only restore the cut size if the stride divides it."""
    h, w = cut_shape[-2:]
    if spec.channels is not None and (h % spec.stride or w % spec.stride):
        raise ValueError(
            f"bottleneck stride S{spec.stride} does not divide the {h}x{w} feature map at the cut; "
            "use a smaller S or another cut/image_size"
        )
