"""Audit budgets: ``smoke`` (a minute, checks the plumbing) and ``standard`` (the numbers to report)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

from .adaptive import AdaptiveConfig
from .decoder import DecoderConfig
from .gan import GANConfig
from .loop import LoopConfig
from .whitebox import WhiteboxConfig

__all__ = ["AuditPreset", "PRESETS", "get_preset"]


@dataclass(frozen=True)
class AuditPreset:
    """Every budget of an audit. ``None`` image limits mean all images; ``clusters_per_class``: the bound's k-means."""

    name: str
    max_train_images: Optional[int]
    max_test_images: Optional[int]
    decoder: DecoderConfig = DecoderConfig()
    decoder_loop: LoopConfig = LoopConfig()
    adaptive: AdaptiveConfig = AdaptiveConfig()
    adaptive_loop: LoopConfig = LoopConfig()
    gan: GANConfig = GANConfig()
    gan_loop: LoopConfig = LoopConfig()
    whitebox: WhiteboxConfig = WhiteboxConfig()
    clusters_per_class: int = 3
    bound_images: int = 5000
    display_images: int = 8
    extra: dict = field(default_factory=dict)

    def with_overrides(self, overrides: Optional[dict]) -> "AuditPreset":
        """A copy with ``{"field": v}`` or ``{"section.field": v}`` replaced (sections: decoder, decoder_loop, ...)."""
        preset = self
        for key, value in (overrides or {}).items():
            section, _, name = key.rpartition(".")
            if not section:
                if key not in {f.name for f in dataclasses.fields(self)} or key in ("name", "extra"):
                    raise ValueError(f"unknown audit override {key!r}")
                preset = dataclasses.replace(preset, **{key: value})
                continue
            part = getattr(preset, section, None)
            if not dataclasses.is_dataclass(part) or name not in {f.name for f in dataclasses.fields(part)}:
                raise ValueError(f"unknown audit override {key!r}")
            preset = dataclasses.replace(preset, **{section: dataclasses.replace(part, **{name: value})})
        return preset


_SMOKE_DECODER = dict(batch_size=16, num_blocks=1, width=16)
PRESETS = {
    "smoke": AuditPreset(
        name="smoke",
        max_train_images=500,
        max_test_images=100,
        decoder=DecoderConfig(lr=1e-2, t_max=5, **_SMOKE_DECODER),
        decoder_loop=LoopConfig(max_epochs=5, patience=3),
        adaptive=AdaptiveConfig(lr=2e-3, draws=2, t_max=2, **_SMOKE_DECODER),
        adaptive_loop=LoopConfig(max_epochs=2, patience=2),
        gan=GANConfig(batch_size=16, n_critic=2, t_max=2),
        gan_loop=LoopConfig(max_epochs=1, patience=1),
        whitebox=WhiteboxConfig(steps=30, lr=0.03, n_images=16, batch_size=16),
        bound_images=500,
    ),
    "standard": AuditPreset(
        name="standard",
        max_train_images=10_000,
        max_test_images=1000,
        decoder=DecoderConfig(batch_size=128, t_max=15),
        decoder_loop=LoopConfig(max_epochs=15, patience=3),
        adaptive=AdaptiveConfig(batch_size=128, draws=2, t_max=4),
        adaptive_loop=LoopConfig(max_epochs=4, patience=2),
        gan=GANConfig(t_max=10),
        gan_loop=LoopConfig(max_epochs=5, patience=2),
        whitebox=WhiteboxConfig(steps=200, n_images=128, batch_size=64),
        bound_images=5000,
    ),
}


def get_preset(preset) -> AuditPreset:
    """A preset by name, or an :class:`AuditPreset` as is."""
    if isinstance(preset, AuditPreset):
        return preset
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or an AuditPreset, got {preset!r}")
    return PRESETS[preset]
