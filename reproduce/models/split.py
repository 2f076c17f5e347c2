"""SplitModel (client encoder + server) and the public factory ``build_split_model``."""

from __future__ import annotations

import torch
from torch import nn

from .bottleneck import parse_bottleneck
from .resnet import build_resnet20
from .vgg import build_vgg11_bn

ARCHS = ("vgg11_bn", "resnet20")


class SplitModel(nn.Module):
    """A network cut in two: ``encoder`` runs on the client (phone), ``server`` in the cloud.

    ``forward(x) == server(encoder(x))``; ``smashed_shape`` is the (C, H, W) of ``encoder(x)``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        server: nn.Module,
        smashed_shape: tuple[int, int, int],
        arch: str,
        cut: int,
        num_classes: int,
        image_size: int,
    ):
        super().__init__()
        self.encoder = encoder
        self.server = server
        self.smashed_shape = tuple(int(s) for s in smashed_shape)
        self.arch = arch
        self.cut = cut
        self.num_classes = num_classes
        self.image_size = image_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.server(self.encoder(x))


def build_split_model(
    arch: str,
    num_classes: int,
    cut: int,
    image_size: int,
    in_channels: int = 3,
    bottleneck: str = "noRELU_C8S1",
    sigmoid: bool = True,
    extra_client_layer: bool = False,
) -> SplitModel:
    """Build a split network as the authors do.

    arch: "vgg11_bn" (cut 1..13, counting config entries including 'M'; the paper uses 1..5)
        or "resnet20" (the authors' CIFAR ResNet-20 variant, cut 1..10 layer-list entries).
    bottleneck: option string (see ``reproduce.models.bottleneck``) or "none".
    sigmoid: True = Sigmoid at the cut (the paper's "_sgm" models); False = BatchNorm there.
    extra_client_layer: PATROL's ``double_local_layer`` (one more conv on the client).
    Raises ValueError for an unknown arch, an out-of-range cut or an unsupported image_size.
    """
    if not isinstance(arch, str) or arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    for name, value, low in (
        ("num_classes", num_classes, 1),
        ("cut", cut, 1),
        ("image_size", image_size, 1),
        ("in_channels", in_channels, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    spec = parse_bottleneck(bottleneck)
    builder = build_vgg11_bn if arch == "vgg11_bn" else build_resnet20
    encoder, server, smashed_shape = builder(
        num_classes=num_classes,
        cut=cut,
        image_size=image_size,
        in_channels=in_channels,
        spec=spec,
        sigmoid=bool(sigmoid),
        extra_client_layer=bool(extra_client_layer),
    )
    return SplitModel(
        encoder, server, smashed_shape, arch=arch, cut=cut, num_classes=num_classes, image_size=image_size
    )
