"""ResSFL-style adversarial representation learning: a simulated attacker inside training.

The defender owns a small decoder ("simulated attacker", ``ResDecoder`` with 4 residual blocks,
64 channels, Sigmoid output) that learns to invert the smashed data:

* ``pretrain``: before training, the decoder is trained with MSE for ``pretrain_epochs``
  (authors: 30, Adam 1e-3, cosine to 1e-5). Data: the TRAINING split by default; the authors
  pretrain on the first 90 % of the test split (``pretrain_split="test"``, the trainer builds
  that loader).
* ``adversary_step``: every batch, ``steps`` Adam updates of the decoder on the detached
  features, loss ``-SSIM(decoder(z), x)``. The features are those of the training forward
  (train-mode BN), reused detached; the authors recompute them with the encoder in eval mode
  (one more encoder forward per batch).
* ``regularizer``: the encoder is penalised by ``strength * relu(SSIM(decoder(z), x) - threshold)``
  (zero below the threshold; with threshold 0 it is ``strength * SSIM``).

SSIM: torchmetrics' differentiable SSIM, 11x11 Gaussian window, sigma 1.5, data range 1, on
images in [0, 1]. The defaults are the authors' shipped settings: strength 0.3 (their
``run_exp.sh`` sets ``AT_regularization_strength=0.3``, which their code uses as the SSIM
penalty's weight ``alpha2``), threshold 0.5 (0.6 for FaceScrub and TinyImageNet), one decoder
step per batch (``gan_adv_step1``), decoder ``res_normN4C64``; their PATROL string parses to
3 steps (``Patrol``'s default).

What the decoder sees (``adversary_sees``): by default the clean features ``z``, as in the
authors' code, also inside ``noise_arl`` (their decoder step and penalty use ``z``, the noise
only goes to the server). ``adversary_sees="perturbed"`` (``--adversary-sees perturbed``) gives
it the preceding perturbation of a combination (``feature_transform``), i.e. what a real
attacker receives.

Deliberate difference: the decoder is pretrained on the TRAINING split by default; the
authors' pretraining uses the first 90 % of the test split, from which the inference-time
attacker's data also comes (a leak between defence and evaluation). ``pretrain_split="test"``
reproduces theirs.

Speed: ``setup(..., bf16_autocast=True)`` (the trainer's ``--bf16-autocast``) runs the decoder's
convolutions under CPU bf16 autocast in all three places; its weights, the SSIM and the penalty stay
float32 (1.44x a Noise_ARL step at ``cpu-full``, ``docs/presets.md``).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from .base import Defence, check_positive

_HIGH_RES_DATASETS = ("facescrub", "tinyimagenet")
_AUTHORS_DECODER_MILESTONES = (60, 150, 240, 260)  # of 240 epochs, gamma 0.2
AUTHORS_STRENGTH = 0.3  # run_exp.sh: AT_regularization_strength=0.3 (their alpha2)


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean SSIM of two image batches in [0, 1] (11x11 Gaussian window, sigma 1.5); differentiable."""
    return structural_similarity_index_measure(a, b, gaussian_kernel=True, sigma=1.5, kernel_size=11, data_range=1.0)


def default_ssim_threshold(dataset: str) -> float:
    """The authors' per-dataset SSIM threshold."""
    return 0.6 if any(dataset.lower().startswith(d) for d in _HIGH_RES_DATASETS) else 0.5


class AdversarialReconstruction(Defence):
    """ResSFL: adversarial training against a simulated decoder attacker (see module docstring)."""

    name = "ressfl"
    needs_unit_images = True

    def __init__(
        self,
        strength: float = AUTHORS_STRENGTH,
        ssim_threshold: Optional[float] = None,
        steps: int = 1,
        decoder_blocks: int = 4,
        decoder_width: int = 64,
        lr: float = 1e-3,
        pretrain_epochs: int = 30,
        pretrain_split: str = "train",
        adversary_sees: str = "clean",
    ):
        super().__init__()
        self.strength = check_positive(strength, "strength")
        self.ssim_threshold = (
            None if ssim_threshold is None else check_positive(ssim_threshold, "ssim_threshold", allow_zero=True)
        )
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        if isinstance(pretrain_epochs, bool) or not isinstance(pretrain_epochs, int) or pretrain_epochs < 0:
            raise ValueError(f"pretrain_epochs must be an int >= 0, got {pretrain_epochs!r}")
        if pretrain_split not in ("train", "test"):
            raise ValueError(f"pretrain_split must be 'train' or 'test', got {pretrain_split!r}")
        if adversary_sees not in ("perturbed", "clean"):
            raise ValueError(f"adversary_sees must be 'perturbed' or 'clean', got {adversary_sees!r}")
        self.steps = steps
        self.decoder_blocks = int(decoder_blocks)
        self.decoder_width = int(decoder_width)
        self.lr = check_positive(lr, "lr")
        self.pretrain_epochs = pretrain_epochs
        self.pretrain_split = pretrain_split
        self.adversary_sees = adversary_sees
        self.total_epochs = 1
        self.pretrained = False
        self.decoder: Optional[nn.Module] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        self.bf16_autocast = False  # setup's: the decoder's convolutions under CPU bf16 autocast
        # Set by a combination (e.g. noise_arl): the perturbation applied before this defence.
        self.feature_transform: Callable[[torch.Tensor], torch.Tensor] = lambda z: z

    # -- setup -----------------------------------------------------------------------------
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
        from reproduce.models import ResDecoder  # H1's decoder (Sigmoid output)

        c, h, w = model.smashed_shape
        if h != w:
            raise ValueError(f"the decoder needs square smashed data, got {model.smashed_shape}")
        if self.ssim_threshold is None:
            self.ssim_threshold = default_ssim_threshold(dataset)
        self.total_epochs = int(total_epochs)
        self.bf16_autocast = bool(bf16_autocast)
        self.decoder = ResDecoder(
            c, h, image_size, out_channels=in_channels, num_blocks=self.decoder_blocks, width=self.decoder_width
        ).to(device)
        self.optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)

    def _require_setup(self):
        if self.decoder is None:
            raise RuntimeError(f"{type(self).__name__}.setup(model, ...) must be called first")

    def _adversary_input(self, z: torch.Tensor) -> torch.Tensor:
        return self.feature_transform(z) if self.adversary_sees == "perturbed" else z

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        """The simulated attacker's reconstruction of ``z``, float32; its convolutions in bf16 under
        ``bf16_autocast`` (the SSIM, the penalty and the decoder's weights stay float32)."""
        if not self.bf16_autocast:
            return self.decoder(z)
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            return self.decoder(z).float()

    # -- the three hooks ---------------------------------------------------------------------
    def adversary_step(self, x_unit: Optional[torch.Tensor], z: torch.Tensor) -> dict:
        self._require_setup()
        if x_unit is None:
            raise ValueError("x_unit (images in [0, 1]) is required by the adversarial defence")
        with torch.no_grad():
            z_in = self._adversary_input(z.detach())
        self.decoder.train()
        score = None
        for _ in range(self.steps):
            self.optimizer.zero_grad(set_to_none=True)
            score = ssim(self._decode(z_in), x_unit)
            (-score).backward()
            self.optimizer.step()
        return {"adv_ssim": score.detach()}

    def regularizer(self, x, z, y, *, x_unit=None):
        self._require_setup()
        if x_unit is None:
            raise ValueError("x_unit (images in [0, 1]) is required by the adversarial defence")
        self.decoder.eval()
        # The penalty's gradient must reach the encoder only, not the decoder's parameters.
        flags = [p.requires_grad for p in self.decoder.parameters()]
        for p in self.decoder.parameters():
            p.requires_grad_(False)
        try:
            score = ssim(self._decode(self._adversary_input(z)), x_unit)
        finally:
            for p, f in zip(self.decoder.parameters(), flags):
                p.requires_grad_(f)
        if self.ssim_threshold == 0:
            return self.strength * score
        return self.strength * F.relu(score - self.ssim_threshold)

    def pretrain(self, encoder: nn.Module, loader: Iterable, *, denormalize, device, progress: bool = False) -> dict:
        """MSE pretraining of the decoder on a frozen encoder (eval mode)."""
        self._require_setup()
        if self.pretrained or self.pretrain_epochs == 0:
            return {}
        from tqdm.auto import tqdm

        opt = torch.optim.Adam(self.decoder.parameters(), lr=self.lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.pretrain_epochs, eta_min=1e-5)
        was_training = encoder.training
        encoder.eval()
        self.decoder.train()
        last = float("nan")
        for _ in tqdm(range(self.pretrain_epochs), desc="pretrain decoder", disable=not progress):
            total, count = 0.0, 0
            for x, _y in loader:
                x = x.to(device)
                with torch.no_grad():
                    z_in = self._adversary_input(encoder(x))
                opt.zero_grad(set_to_none=True)
                loss = F.mse_loss(self._decode(z_in), denormalize(x))
                loss.backward()
                opt.step()
                total += loss.item() * x.shape[0]
                count += x.shape[0]
            sched.step()
            last = total / max(count, 1)
        encoder.train(was_training)
        self.pretrained = True
        return {"pretrain_mse": last}

    def on_epoch_start(self, epoch, model, optimizers) -> bool:
        if self.optimizer is not None:
            # The authors' decoder schedule, MultiStep [60,150,240,260] of 240 epochs, scaled.
            scale = self.total_epochs / 240.0
            passed = sum(1 for m in _AUTHORS_DECODER_MILESTONES if epoch - 1 >= math.ceil(m * scale))
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr * 0.2**passed
        return False

    # -- state (optimizer and flags travel with state_dict) ----------------------------------
    def get_extra_state(self):
        return {
            "pretrained": self.pretrained,
            "ssim_threshold": self.ssim_threshold,
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
        }

    def set_extra_state(self, state):
        self.pretrained = bool(state["pretrained"])
        self.ssim_threshold = state["ssim_threshold"]
        if state["optimizer"] is not None and self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])

    def describe(self) -> dict:
        return {
            "name": self.name,
            "strength": self.strength,
            "ssim_threshold": self.ssim_threshold,
            "steps": self.steps,
            "decoder_blocks": self.decoder_blocks,
            "decoder_width": self.decoder_width,
            "lr": self.lr,
            "pretrain_epochs": self.pretrain_epochs,
            "pretrain_split": self.pretrain_split,
            "adversary_sees": self.adversary_sees,
            "bf16_autocast": self.bf16_autocast,
        }
