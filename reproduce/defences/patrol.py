"""PATROL: an extra client layer, ResSFL-style adversarial training, then channel pruning.

* The model is built with ``extra_client_layer=True`` (one more conv on the client).
* Adversarial reconstruction exactly as ``AdversarialReconstruction`` (ResSFL), with the
  authors' PATROL settings: 3 decoder steps per batch (their ``gan_adv_step1_pruning180``
  string fails to parse as a step count and falls back to 3), strength 0.3, threshold 0.5.
* At epoch ``prune_epoch`` (default: 3/4 of training, the authors' 180 of 240) the client's
  conv channels are pruned with torch-pruning (structural pruning that keeps the graph
  consistent).
* Pruning, by default as the authors shipped it (``authors_pruning``): ratio 0.05, Taylor
  importance from a dummy loss ``encoder(randn).sum()``, convs with <= 32 output channels left
  alone. Giving ``pruning_ratio`` (``--pruning-ratio``) or ``importance`` switches to the
  project's own pruning instead: ``pruning_ratio="match"`` searches the smallest uniform ratio
  that brings the encoder's parameter count down to that of the model built without the extra
  layer (the paper: "adjusts the pruning ratio so that the encoder in PATROL remains the same
  size as in the other methods"), importance L1 magnitude unless given.
* The encoder's output conv is never pruned (the smashed shape stays fixed).
* After pruning the trainer re-points the client optimizer at the new parameters (the authors'
  code kept stepping the stale tensors, freezing the pruned layers).
"""

from __future__ import annotations

import copy
from typing import Optional, Union

import torch
from torch import nn

from .adversarial import AdversarialReconstruction

PRUNE_FRACTION = 180 / 240
AUTHORS_PRUNING_RATIO = 0.05
AUTHORS_MIN_CHANNELS = 32
AUTHORS_PATROL_STEPS = 3


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _output_convs(encoder: nn.Module) -> list[nn.Module]:
    """The conv that produces the encoder's output channels (the last one registered, which holds
    for the sequential client stacks built by ``reproduce.models``)."""
    convs = [m for m in encoder.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1:]


def prune_channels(
    encoder: nn.Module, example: torch.Tensor, ratio: float, *, importance: str = "l1", min_channels: int = 0
) -> nn.Module:
    """Prune ``ratio`` of the output channels of every prunable conv of ``encoder`` in place.

    Prunable: Conv2d layers with more than ``min_channels`` outputs, except the output conv.
    Returns the same module (its pruned layers hold new Parameter objects).
    """
    import torch_pruning as tp

    if not 0 <= ratio < 1:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return encoder
    ignored = list(_output_convs(encoder))
    ignored += [
        m for m in encoder.modules() if isinstance(m, nn.Conv2d) and m.out_channels <= min_channels and m not in ignored
    ]
    if importance == "l1":
        imp = tp.importance.GroupMagnitudeImportance(p=1)
    elif importance == "taylor":
        imp = tp.importance.GroupTaylorImportance()
    else:
        raise ValueError(f"importance must be 'l1' or 'taylor', got {importance!r}")
    was_training = encoder.training
    pruner = tp.pruner.MetaPruner(encoder, example, importance=imp, pruning_ratio=ratio, ignored_layers=ignored)
    if importance == "taylor":
        encoder.zero_grad(set_to_none=True)
        gen = torch.Generator(device="cpu").manual_seed(0)
        encoder(torch.randn(example.shape, generator=gen).to(example.device)).sum().backward()
    pruner.step()
    encoder.zero_grad(set_to_none=True)
    encoder.train(was_training)
    return encoder


def matching_ratio(
    encoder: nn.Module,
    example: torch.Tensor,
    target_params: int,
    *,
    importance: str = "l1",
    max_ratio: float = 0.9,
    iters: int = 10,
) -> float:
    """Smallest uniform ratio (bisection on copies) with ``count_params(pruned) <= target_params``."""
    if count_params(encoder) <= target_params:
        return 0.0
    lo, hi = 0.0, max_ratio
    probe = copy.deepcopy(encoder)
    prune_channels(probe, example, hi, importance=importance)
    if count_params(probe) > target_params:
        return hi  # cannot reach the target; prune as far as allowed
    for _ in range(iters):
        mid = (lo + hi) / 2
        probe = copy.deepcopy(encoder)
        prune_channels(probe, example, mid, importance=importance)
        if count_params(probe) <= target_params:
            hi = mid
        else:
            lo = mid
    return hi


class Patrol(AdversarialReconstruction):
    """PATROL = ResSFL + extra client layer + channel pruning (see module docstring)."""

    name = "patrol"
    extra_client_layer = True

    def __init__(
        self,
        prune_epoch: Optional[int] = None,
        pruning_ratio: Union[str, float, None] = None,
        importance: Optional[str] = None,
        authors_pruning: Optional[bool] = None,
        **adversarial_options,
    ):
        adversarial_options.setdefault("steps", AUTHORS_PATROL_STEPS)
        super().__init__(**adversarial_options)
        if authors_pruning is None:  # the authors' pruning unless the project's is asked for
            authors_pruning = pruning_ratio is None and importance is None
        if pruning_ratio is None:
            pruning_ratio = "match"
        if importance is None:
            importance = "l1"
        if pruning_ratio != "match":
            pruning_ratio = float(pruning_ratio)
            if not 0 <= pruning_ratio < 1:
                raise ValueError(f"pruning_ratio must be 'match' or in [0, 1), got {pruning_ratio}")
        if importance not in ("l1", "taylor"):
            raise ValueError(f"importance must be 'l1' or 'taylor', got {importance!r}")
        if prune_epoch is not None and (isinstance(prune_epoch, bool) or int(prune_epoch) < 1):
            raise ValueError(f"prune_epoch must be an int >= 1, got {prune_epoch!r}")
        self.authors_pruning = bool(authors_pruning)
        if self.authors_pruning:
            pruning_ratio, importance = AUTHORS_PRUNING_RATIO, "taylor"
        self.prune_epoch = None if prune_epoch is None else int(prune_epoch)
        self.pruning_ratio = pruning_ratio
        self.importance = importance
        self.pruned = False
        self.applied_ratio: Optional[float] = None
        self.baseline_encoder_params: Optional[int] = None
        self.image_size = 32
        self.in_channels = 3

    def setup(
        self,
        model,
        *,
        image_size,
        in_channels=3,
        dataset="",
        device="cpu",
        total_epochs=1,
        baseline_encoder_params=None,
        bf16_autocast=False,
    ):
        super().setup(
            model,
            image_size=image_size,
            in_channels=in_channels,
            dataset=dataset,
            device=device,
            total_epochs=total_epochs,
            bf16_autocast=bf16_autocast,
        )
        if self.prune_epoch is None:
            self.prune_epoch = max(1, round(PRUNE_FRACTION * total_epochs))
        self.baseline_encoder_params = baseline_encoder_params
        self.image_size, self.in_channels = int(image_size), int(in_channels)

    def on_epoch_start(self, epoch, model, optimizers) -> bool:
        super().on_epoch_start(epoch, model, optimizers)
        if self.pruned or epoch != self.prune_epoch:
            return False
        encoder = model.encoder
        device = next(encoder.parameters()).device
        example = torch.zeros(1, self.in_channels, self.image_size, self.image_size, device=device)
        min_channels = AUTHORS_MIN_CHANNELS if self.authors_pruning else 0
        ratio = self.pruning_ratio
        if ratio == "match":
            if self.baseline_encoder_params is None:
                raise ValueError("pruning_ratio='match' needs baseline_encoder_params in setup()")
            ratio = matching_ratio(encoder, example, self.baseline_encoder_params, importance=self.importance)
        prune_channels(encoder, example, ratio, importance=self.importance, min_channels=min_channels)
        self.pruned = True
        self.applied_ratio = float(ratio)
        return True

    def get_extra_state(self):
        state = super().get_extra_state()
        state.update(pruned=self.pruned, applied_ratio=self.applied_ratio, prune_epoch=self.prune_epoch)
        return state

    def set_extra_state(self, state):
        super().set_extra_state(state)
        self.pruned = bool(state["pruned"])
        self.applied_ratio = state["applied_ratio"]
        self.prune_epoch = state["prune_epoch"]

    def describe(self) -> dict:
        d = super().describe()
        d.update(
            name=self.name,
            prune_epoch=self.prune_epoch,
            pruning_ratio=self.pruning_ratio,
            importance=self.importance,
            authors_pruning=self.authors_pruning,
            baseline_encoder_params=self.baseline_encoder_params,
        )
        return d
