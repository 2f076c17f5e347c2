"""The authors' split ResNet-20 variant (5x5 stem, widths 32/64/128, every stage stride 2).

Layer list (10 entries, ``cut`` = how many go to the client): the stem
conv5x5(in->16)+BN+ReLU, then 3 stages x 3 basic blocks. The first block of each stage halves
the resolution and uses the "option A" shortcut (stride-2 subsampling + zero channels).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from .bottleneck import BottleneckSpec, check_stride, make_encoder, make_server_features, probe_shape

STEM_CHANNELS = 16
STAGE_WIDTHS = (32, 64, 128)
BLOCKS_PER_STAGE = 3
NUM_ENTRIES = 1 + len(STAGE_WIDTHS) * BLOCKS_PER_STAGE


class ZeroPadShortcut(nn.Module):
    """Option A: keep every second pixel, pad the new channels with zeros (no parameters)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetServer(nn.Module):
    """Server half: bottleneck decoder + remaining blocks + global average pool + Linear(128, classes)."""

    def __init__(self, features: nn.Module, num_classes: int):
        super().__init__()
        self.features = features
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(STAGE_WIDTHS[-1], num_classes)

    def forward(self, z):
        return self.classifier(self.pool(self.features(z)).flatten(1))


def _he_normal_init(module: nn.Module) -> None:
    """The authors' init: conv weights ~ N(0, sqrt(2/(k*k*out))), BN weight 1 / bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _layer_list(in_channels: int) -> list[nn.Module]:
    layers: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, 5, padding=2, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(inplace=True),
        )
    ]
    c = STEM_CHANNELS
    for width in STAGE_WIDTHS:
        for i in range(BLOCKS_PER_STAGE):
            layers.append(BasicBlock(c, width, stride=2 if i == 0 else 1))
            c = width
    return layers


def _channels_after(cut: int) -> int:
    return STEM_CHANNELS if cut == 1 else STAGE_WIDTHS[(cut - 2) // BLOCKS_PER_STAGE]


def build_resnet20(
    num_classes: int,
    cut: int,
    image_size: int,
    in_channels: int,
    spec: BottleneckSpec,
    sigmoid: bool,
    extra_client_layer: bool,
):
    """Return (encoder, server, smashed_shape); see ``build_split_model`` for the arguments.

    ``extra_client_layer`` (PATROL) inserts conv3x3(16->16)+BN+ReLU right after the stem; the
    client keeps the same ``cut`` original entries (the authors shift the cut by one for it).
    """
    if not 1 <= cut <= NUM_ENTRIES:
        raise ValueError(f"cut must be in 1..{NUM_ENTRIES} for resnet20, got {cut}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8 for resnet20 (three stride-2 stages), got {image_size}")
    layers = _layer_list(in_channels)
    client_layers, server_layers = layers[:cut], layers[cut:]
    if extra_client_layer:
        client_layers.insert(
            1,
            nn.Sequential(
                nn.Conv2d(STEM_CHANNELS, STEM_CHANNELS, 3, padding=1, bias=False),
                nn.BatchNorm2d(STEM_CHANNELS),
                nn.ReLU(inplace=True),
            ),
        )
    cut_channels = _channels_after(cut)

    check_stride(spec, probe_shape(nn.Sequential(*client_layers), (in_channels, image_size, image_size)))
    encoder = make_encoder(client_layers, spec, cut_channels, sigmoid)
    _he_normal_init(encoder)
    smashed_shape = probe_shape(encoder, (in_channels, image_size, image_size))
    features = make_server_features(server_layers, spec, cut_channels)
    _he_normal_init(features.bottleneck)
    return encoder, ResNetServer(features, num_classes), smashed_shape
