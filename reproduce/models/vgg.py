"""Split VGG11-BN (config A), cut counted in config entries including the max-pools."""

from __future__ import annotations

from torch import nn

from .bottleneck import BottleneckSpec, check_stride, make_encoder, make_server_features, probe_shape

CONFIG_A = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")
EXTRA_CHANNELS = 16  # PATROL's double_local_layer: Conv(3->16)+BN+ReLU before the first conv


def _entry(item, in_channels: int) -> tuple[nn.Module, int]:
    """One config entry: 'M' = 2x2 max-pool, an int = conv3x3 + BN + ReLU."""
    if item == "M":
        return nn.MaxPool2d(kernel_size=2, stride=2), in_channels
    return nn.Sequential(nn.Conv2d(in_channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU(inplace=True)), item


class VGGServer(nn.Module):
    """Server half: bottleneck decoder + remaining VGG entries + the 3-layer classifier."""

    def __init__(self, features: nn.Module, flat_dim: int, num_classes: int):
        super().__init__()
        self.features = features
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(flat_dim, 512),
            nn.ReLU(inplace=True),
            nn.Dropout(),
            nn.Linear(512, 512),
            nn.ReLU(inplace=True),
            nn.Linear(512, num_classes),
        )

    def forward(self, z):
        return self.classifier(self.features(z).flatten(1))


def _xavier_init(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def build_vgg11_bn(
    num_classes: int,
    cut: int,
    image_size: int,
    in_channels: int,
    spec: BottleneckSpec,
    sigmoid: bool,
    extra_client_layer: bool,
):
    """Return (encoder, server, smashed_shape); see ``build_split_model`` for the arguments.

    The classifier's input size is derived from the image size (512 for 32/48 px, 2048 for 64 px,
    matching the authors' ``upsize`` switch at > 63 px).
    """
    if not 1 <= cut <= len(CONFIG_A):
        raise ValueError(f"cut must be in 1..{len(CONFIG_A)} for vgg11_bn, got {cut}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 for vgg11_bn (five 2x2 max-pools), got {image_size}")
    if extra_client_layer and cut < 2:
        raise ValueError("extra_client_layer needs cut >= 2 for vgg11_bn (the authors add it only then)")

    client_layers: list[nn.Module] = []
    c = in_channels
    if extra_client_layer:
        client_layers.append(
            nn.Sequential(
                nn.Conv2d(c, EXTRA_CHANNELS, 3, padding=1), nn.BatchNorm2d(EXTRA_CHANNELS), nn.ReLU(inplace=True)
            )
        )
        c = EXTRA_CHANNELS
    for item in CONFIG_A[:cut]:
        layer, c = _entry(item, c)
        client_layers.append(layer)
    cut_channels = c
    server_layers: list[nn.Module] = []
    for item in CONFIG_A[cut:]:
        layer, c = _entry(item, c)
        server_layers.append(layer)

    check_stride(spec, probe_shape(nn.Sequential(*client_layers), (in_channels, image_size, image_size)))
    encoder = make_encoder(client_layers, spec, cut_channels, sigmoid)
    _xavier_init(encoder)
    smashed_shape = probe_shape(encoder, (in_channels, image_size, image_size))
    features = make_server_features(server_layers, spec, cut_channels)
    flat_dim = 1
    for s in probe_shape(features, smashed_shape):
        flat_dim *= s
    return encoder, VGGServer(features, flat_dim, num_classes), smashed_shape
