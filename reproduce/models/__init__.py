"""Split models (client encoder / server), the bottleneck, and the attack networks."""

from .bottleneck import BottleneckSpec, parse_bottleneck
from .critic import WGANCritic
from .decoder import ResBlock, ResDecoder
from .split import ARCHS, SplitModel, build_split_model

__all__ = [
    "ARCHS",
    "BottleneckSpec",
    "ResBlock",
    "ResDecoder",
    "SplitModel",
    "WGANCritic",
    "build_split_model",
    "parse_bottleneck",
]
