"""ResDecoder: the authors' ``res_normN_AE`` image decoder, for any power-of-two upscaling.

Used by the decoder model-inversion attack (N=8), as the GAN attack's generator (N=8) and as
the ResSFL/PATROL defender's simulated attacker (N=4).
"""

from __future__ import annotations

from torch import nn


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3-BN-ReLU-conv3x3 + shortcut.

    The shortcut is the identity, or conv1x1 + BN when the channel count changes.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.ReLU(),
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.BatchNorm2d(out_channels), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        if in_channels == out_channels:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1), nn.BatchNorm2d(out_channels))

    def forward(self, x):
        return self.body(x) + self.shortcut(x)


class ResDecoder(nn.Module):
    """Smashed data ``[B, in_channels, in_size, in_size]`` -> image ``[B, out_channels, out_size, out_size]`` in (0,1).

    ResBlock(in->width)+ReLU, ``num_blocks`` x [ResBlock(width->width)+ReLU], then
    log2(out_size/in_size) x [ConvT(width,width,3,s2,p1,op1)+BN+ReLU], then
    ResBlock(width->out_channels) + Sigmoid. Unlike the authors' code (which hard-codes the
    input width to image/4) this works for any ``out_size / in_size`` that is a power of two >= 1.
    """

    def __init__(self, in_channels: int, in_size: int, out_size: int, out_channels: int = 3,
                 num_blocks: int = 8, width: int = 64):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("in_size", in_size, 1),
                                 ("out_size", out_size, 1), ("out_channels", out_channels, 1),
                                 ("num_blocks", num_blocks, 0), ("width", width, 1)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        ratio, rem = divmod(out_size, in_size)
        if rem or ratio & (ratio - 1):
            raise ValueError(f"out_size/in_size must be a power of two >= 1, got out_size={out_size}, "
                             f"in_size={in_size}")
        self.in_channels, self.in_size, self.out_size = in_channels, in_size, out_size
        layers: list[nn.Module] = [ResBlock(in_channels, width), nn.ReLU()]
        for _ in range(num_blocks):
            layers += [ResBlock(width, width), nn.ReLU()]
        for _ in range(ratio.bit_length() - 1):
            layers += [nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(width), nn.ReLU()]
        layers += [ResBlock(width, out_channels), nn.Sigmoid()]
        self.net = nn.Sequential(*layers)

    def forward(self, z):
        if z.dim() != 4 or z.shape[1] != self.in_channels or z.shape[-2:] != (self.in_size, self.in_size):
            raise ValueError(f"ResDecoder expects z of shape [B, {self.in_channels}, {self.in_size}, "
                             f"{self.in_size}], got {list(z.shape)}")
        return self.net(z)
