"""WGANCritic: the GAN attack's discriminator (GMI's DGWGAN32), for 32, 48 or 64 px images."""

from __future__ import annotations

from torch import nn


def _halved(size: int) -> int:
    return (size + 1) // 2  # a 5x5 conv with stride 2 and padding 2 gives ceil(size/2)


class WGANCritic(nn.Module):
    """Image ``[B, in_channels, S, S]`` -> unbounded score ``[B]``.

    Conv5x5 s2 (in->64) + LeakyReLU(0.2), then 2 x [Conv5x5 s2 + InstanceNorm(affine) +
    LeakyReLU(0.2)] (64->128->256), all with padding 2; the final conv's kernel equals the
    remaining spatial size (4 at 32 px, as DGWGAN32's Conv4x4; 6 at 48 px; 8 at 64 px).
    """

    def __init__(self, in_channels: int = 3, image_size: int = 32):
        super().__init__()
        for name, value, low in (("in_channels", in_channels, 1), ("image_size", image_size, 8)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"{name} must be an int, got {type(value).__name__}")
            if value < low:
                raise ValueError(f"{name} must be >= {low}, got {value}")
        self.in_channels, self.image_size = in_channels, image_size
        final = _halved(_halved(_halved(image_size)))
        self.net = nn.Sequential(
            nn.Conv2d(in_channels, 64, 5, stride=2, padding=2), nn.LeakyReLU(0.2),
            nn.Conv2d(64, 128, 5, stride=2, padding=2), nn.InstanceNorm2d(128, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(128, 256, 5, stride=2, padding=2), nn.InstanceNorm2d(256, affine=True), nn.LeakyReLU(0.2),
            nn.Conv2d(256, 1, final),
        )

    def forward(self, x):
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"WGANCritic expects x of shape [B, {self.in_channels}, {self.image_size}, "
                             f"{self.image_size}], got {list(x.shape)}")
        return self.net(x).flatten()
