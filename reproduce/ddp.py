"""Data-parallel training under torchrun: the process context, the global-batch sampler, CPU SyncBatchNorm.

``reproduce.train`` trains data-parallel when ``WORLD_SIZE > 1`` (torchrun): ``--batch-size`` is the global
batch, each rank takes its slice of the 1-process loader's batch (``GlobalBatchShard``), BatchNorm uses the
statistics of the global batch (``convert_sync_batchnorm``; gloo on CPU), so two processes train the run one
process would. Outside torchrun every helper here is a no-op.
"""

from __future__ import annotations

import os
import warnings

import torch

from cem_fast.distributed import all_gather_rows


class Dist:
    """Data-parallel context from torchrun's environment (WORLD_SIZE > 1); a no-op otherwise."""

    def __init__(self, device: torch.device):
        import torch.distributed as dist

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.group = None
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
            self.group = dist.group.WORLD

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            import torch.distributed as dist

            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def gather_objects(self, obj) -> list:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def gather_rows(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate ``x [n_r, ...]`` of all ranks in rank order (the ``n_r`` may differ)."""
        return all_gather_rows(x, self.group)


class GlobalBatchShard(torch.utils.data.Sampler):
    """This rank's rows of each global batch of ``batches`` (a batch sampler over the whole dataset).

    Rank ``r`` of ``W`` takes rows ``[r*b//W, (r+1)*b//W)`` of a batch of ``b`` rows, so the ranks' shards
    concatenated in rank order are exactly the 1-process batch. ``positions`` lists the epoch-order
    positions of the rows this rank was given so far in the current epoch (for the CEM refit's order).
    """

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world
        self.positions: list[int] = []

    def __iter__(self):
        self.positions = []
        start = 0
        for batch in self.batches:
            b = len(batch)
            lo, hi = self.rank * b // self.world, (self.rank + 1) * b // self.world
            self.positions.extend(range(start + lo, start + hi))
            start += b
            yield batch[lo:hi]

    def __len__(self) -> int:
        return len(self.batches)


class _GlooSyncBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Train-mode BatchNorm with statistics over all ranks, for CPU tensors (torch's SyncBatchNorm is GPU-only).

    Two differentiable all-reduces per layer (sum and count, then squared deviations). Their backward sums
    the gradients over the ranks, so after DDP's averaging each parameter gets the gradient of the
    global batch. Eval mode, and training outside torch.distributed, is plain BatchNorm.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, process_group=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if not (
            self.training
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size(self.process_group) > 1
        ):
            return super().forward(x)
        self._check_input_dim(x)
        from torch.distributed.nn.functional import all_reduce

        group = self.process_group or dist.group.WORLD
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        # In float64, as ATen's CPU BatchNorm accumulates: float32 sums lose ~1e-4 in small-variance channels.
        xd = x.double()
        count = xd.new_full((1,), x.numel() // x.shape[1] if x.numel() else 0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # its replacement has no autograd support
            packed = all_reduce(torch.cat([xd.sum(dims), count]), group=group)
            total = packed[-1]
            mean = packed[:-1] / total
            xc = xd - mean.view(shape)
            var = all_reduce((xc * xc).sum(dims), group=group) / total
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.double().view(shape) + self.bias.double().view(shape)
        y = y.to(x.dtype)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                n = float(total)
                unbiased = var.detach() * (n / (n - 1)) if n > 1 else var.detach()
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y


def convert_sync_batchnorm(module: torch.nn.Module, device: torch.device, process_group=None) -> torch.nn.Module:
    """``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` on accelerators; on CPU the gloo version above.

    Parameters and buffers are shared with the original layers and the state_dict keys stay the same.
    """
    if device.type != "cpu":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        out = _GlooSyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, process_group
        )
        if module.affine:
            out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, convert_sync_batchnorm(child, device, process_group))
    return out


class Net:
    """The encoder and server the step calls (DDP-wrapped under torchrun)."""

    def __init__(self, model, dist_ctx: "Dist", device):
        self.model = model
        self.encoder, self.server = model.encoder, model.server
        if dist_ctx.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Global train-mode BN statistics: the same normalisation as one process on the global batch.
            model.encoder = self.encoder = convert_sync_batchnorm(model.encoder, device)
            model.server = self.server = convert_sync_batchnorm(model.server, device)
            ids = [device.index] if device.type == "cuda" and device.index is not None else None
            self.encoder = DDP(model.encoder, device_ids=ids)
            self.server = DDP(model.server, device_ids=ids)

    def train(self):
        self.model.train()

    def eval(self):
        self.model.eval()
