"""The attack networks: the inversion decoder (any feature shape to any image size) and the WGAN critic.

``ResDecoder`` is the authors' ``res_normN_AE`` for square maps with a power-of-two upscaling (the paper's
attack, used as is so that its numbers stay comparable); ``InversionDecoder`` adds a linear stem for flat
``[N, D]`` features and a final resize for any other map size. ``build_decoder`` picks between them.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ResBlock", "ResDecoder", "InversionDecoder", "WGANCritic", "build_decoder"]


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

    The shortcut is the identity, or conv1x1 + BN when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


def _check_ints(**values) -> None:
    for name, (value, low) in values.items():
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")


def _decoder_layers(
    in_channels: int, width: int, num_blocks: int, n_up: int, out_channels: int, resize_to: tuple | None
) -> list[nn.Module]:
    layers: list[nn.Module] = [ResBlock(in_channels, width), nn.ReLU()]
    for _ in range(num_blocks):
        layers += [ResBlock(width, width), nn.ReLU()]
    for _ in range(n_up):
        layers += [
            nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
        ]
    if resize_to is not None:
        layers.append(nn.Upsample(size=resize_to, mode="bilinear", align_corners=False))
    layers += [ResBlock(width, out_channels), nn.Sigmoid()]
    return layers


class ResDecoder(nn.Module):
    """Smashed data ``[B, in_channels, in_size, in_size]`` -> image ``[B, out_channels, out_size, out_size]`` in (0,1).

    ResBlock(in->width)+ReLU, ``num_blocks`` x [ResBlock(width->width)+ReLU], then
    log2(out_size/in_size) x [ConvT(width,width,3,s2,p1,op1)+BN+ReLU], then
    ResBlock(width->out_channels) + Sigmoid. Unlike the authors' code (which hard-codes the
    input width to image/4) this works for any ``out_size / in_size`` that is a power of two >= 1.
    """

    def __init__(
        self, in_channels: int, in_size: int, out_size: int, out_channels: int = 3, num_blocks: int = 8, width: int = 64
    ):
        super().__init__()
        _check_ints(
            in_channels=(in_channels, 1),
            in_size=(in_size, 1),
            out_size=(out_size, 1),
            out_channels=(out_channels, 1),
            num_blocks=(num_blocks, 0),
            width=(width, 1),
        )
        ratio, rem = divmod(out_size, in_size)
        if rem or ratio & (ratio - 1):
            raise ValueError(
                f"out_size/in_size must be a power of two >= 1, got out_size={out_size}, in_size={in_size}"
            )
        self.in_channels, self.in_size, self.out_size = in_channels, in_size, out_size
        self.net = nn.Sequential(
            *_decoder_layers(in_channels, width, num_blocks, ratio.bit_length() - 1, out_channels, None)
        )

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.in_channels or z.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(
                f"ResDecoder expects z of shape [B, {self.in_channels}, {self.in_size}, "
                f"{self.in_size}], got {list(z.shape)}"
            )
        return self.net(z)


class InversionDecoder(nn.Module):
    """Features of any shape (``(D,)`` or ``(C, H, W)``) -> images ``(c, h, w)`` in (0, 1).

    Flat features go through ``Linear(D, width * s * s)`` to a ``width x s x s`` map (``s`` about a
    quarter of the image side). Maps are upsampled by stride-2 transposed convolutions while they fit,
    then resized (bilinear) to the exact image size, so no ratio needs to be a power of two.
    """

    def __init__(self, feature_shape, image_shape, num_blocks: int = 8, width: int = 64):
        super().__init__()
        feature_shape, image_shape = tuple(int(s) for s in feature_shape), tuple(int(s) for s in image_shape)
        if len(feature_shape) not in (1, 3) or min(feature_shape) < 1:
            raise ValueError(f"feature_shape must be (D,) or (C, H, W), got {feature_shape}")
        if len(image_shape) != 3 or min(image_shape) < 1:
            raise ValueError(f"image_shape must be (channels, height, width), got {image_shape}")
        _check_ints(num_blocks=(num_blocks, 0), width=(width, 1))
        self.feature_shape, self.image_shape = feature_shape, image_shape
        out_c, out_h, out_w = image_shape
        if len(feature_shape) == 1:
            side = max(1, min(out_h, out_w) // 4)
            self.stem = nn.Sequential(
                nn.Linear(feature_shape[0], width * side * side), nn.Unflatten(1, (width, side, side))
            )
            in_c, in_h, in_w = width, side, side
        else:
            self.stem = nn.Identity()
            in_c, in_h, in_w = feature_shape
        n_up = 0
        while in_h << (n_up + 1) <= out_h and in_w << (n_up + 1) <= out_w:
            n_up += 1
        exact = (in_h << n_up, in_w << n_up) == (out_h, out_w)
        self.net = nn.Sequential(
            *_decoder_layers(in_c, width, num_blocks, n_up, out_c, None if exact else (out_h, out_w))
        )

    def forward(self, z):
        if tuple(z.shape[1:]) != self.feature_shape:
            raise ValueError(
                f"InversionDecoder expects z of shape [B, {', '.join(map(str, self.feature_shape))}], "
                f"got {list(z.shape)}"
            )
        return self.net(self.stem(z))


def build_decoder(feature_shape, image_shape, num_blocks: int = 8, width: int = 64) -> nn.Module:
    """The inversion decoder for these shapes: ``ResDecoder`` where it applies, else ``InversionDecoder``."""
    feature_shape, image_shape = tuple(feature_shape), tuple(image_shape)
    if len(feature_shape) == 3 and len(image_shape) == 3:
        c, h, w = feature_shape
        out_c, out_h, out_w = image_shape
        ratio, rem = divmod(out_h, h)
        if h == w and out_h == out_w and not rem and not ratio & (ratio - 1):
            return ResDecoder(c, h, out_h, out_channels=out_c, num_blocks=num_blocks, width=width)
    return InversionDecoder(feature_shape, image_shape, num_blocks=num_blocks, width=width)


def _halved(size: int) -> int:
    return (size + 1) // 2  # a 5x5 conv with stride 2 and padding 2 gives ceil(size/2)


class WGANCritic(nn.Module):
    """Image ``[B, in_channels, S, S]`` -> unbounded score ``[B]`` (GMI's DGWGAN32, for any S >= 8).

    Conv5x5 s2 (in->64) + LeakyReLU(0.2), then 2 x [Conv5x5 s2 + InstanceNorm(affine) +
    LeakyReLU(0.2)] (64->128->256), all with padding 2; the final conv's kernel equals the
    remaining spatial size (4 at 32 px, as DGWGAN32's Conv4x4; 6 at 48 px; 8 at 64 px).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        _check_ints(in_channels=(in_channels, 1), image_size=(image_size, 8))
        self.in_channels, self.image_size = in_channels, image_size
        final = _halved(_halved(_halved(image_size)))
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, stride=2, padding=2),
            nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 5, stride=2, padding=2),
            nn.InstanceNorm2d(128, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(128, 256, 5, stride=2, padding=2),
            nn.InstanceNorm2d(256, affine=True),
            nn.LeakyReLU(0.2),
            nn.Conv2d(256, 1, final),
        )

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"WGANCritic expects x of shape [B, {self.in_channels}, {self.image_size}, "
                f"{self.image_size}], got {list(x.shape)}"
            )
        return self.net(x).flatten()
