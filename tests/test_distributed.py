"""Data-parallel CEMLoss: 2 gloo processes == 1 process on the concatenated batch."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cem_fast import CEMLoss

C, M, D = 3, 2, 7
VARIANTS = ["paper", "official", "official-trained"]


def _data():
    g = torch.Generator().manual_seed(11)
    feats = torch.rand(90, D, generator=g, dtype=torch.float64)
    flabels = torch.arange(90) % C
    z = torch.rand(20, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (20,), generator=g)
    return feats, flabels, z, y


def _run(variant, z, y, feats, flabels, group=None):
    cem = CEMLoss(C, M, variant=variant, dataset_size=90, process_group=group)
    cem.refit(feats, flabels)
    zz = z.clone().requires_grad_(True)
    losses = []
    for _ in range(2):  # two steps: the paper variant's streamed state must agree too
        zz.grad = None
        loss = cem(zz, y)
        loss.backward()
        losses.append(float(loss.detach()))
    return losses, zz.grad, {k: v for k, v in cem.state_dict().items() if isinstance(v, torch.Tensor)}


def _worker(rank, world, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    feats, flabels, z, y = _data()
    sl = slice(0, 13) if rank == 0 else slice(13, 20)  # uneven shards
    fsl = slice(0, 50) if rank == 0 else slice(50, 90)
    results = {}
    for variant in VARIANTS:
        results[variant] = _run(variant, z[sl], y[sl], feats[fsl], flabels[fsl], dist.group.WORLD)
    # a rank with an empty batch still joins the collective
    cem = CEMLoss(C, M, dataset_size=90, process_group=dist.group.WORLD).refit(feats[fsl], flabels[fsl])
    zs = z[sl] if rank == 0 else z[:0]
    results["empty"] = float(cem(zs.clone().requires_grad_(True), y[sl] if rank == 0 else y[:0]).detach())
    # gather=False: every rank passes the complete feature set itself, refit without a second gather
    full = CEMLoss(C, M, dataset_size=90, process_group=dist.group.WORLD).refit(feats, flabels, gather=False)
    results["no_gather"] = {k: v for k, v in full.state_dict().items() if isinstance(v, torch.Tensor)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_processes_match_one_process():
    feats, flabels, z, y = _data()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(2)]
    for variant in VARIANTS:
        losses, grad, state = _run(variant, z, y, feats, flabels)
        for r, sl in ((0, slice(0, 13)), (1, slice(13, 20))):
            r_losses, r_grad, r_state = ranks[r][variant]
            assert r_losses == pytest.approx(losses, rel=1e-12), variant
            # DDP averages over 2 ranks: each rank's gradient is 2x the single-process one
            assert torch.allclose(r_grad / 2, grad[sl], rtol=1e-10, atol=1e-14), variant
            for k, v in state.items():
                assert torch.allclose(r_state[k], v, rtol=1e-10, atol=1e-14), (variant, k)
    single = CEMLoss(C, M, dataset_size=90).refit(feats, flabels)
    assert ranks[0]["empty"] == pytest.approx(float(single(z[:13], y[:13])), rel=1e-12)
    assert ranks[1]["empty"] == ranks[0]["empty"]
    fresh = CEMLoss(C, M, dataset_size=90).refit(feats, flabels)  # `single` has streamed a batch since
    for k, v in fresh.state_dict().items():
        if isinstance(v, torch.Tensor):
            for r in range(2):
                assert torch.equal(ranks[r]["no_gather"][k], v), k
    assert float(ranks[0]["no_gather"]["fitted_size"]) == 90  # not 180: nothing was gathered
    with pytest.raises(TypeError, match="gather"):
        CEMLoss(C, M).refit(feats, flabels, gather="no")
