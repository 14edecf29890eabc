"""Global negatives with 2 CPU ranks (spawn + gloo): VSC equals one process on the concatenated batch;
global ITM mining equals an in-process emulation of the two ranks; mismatched shapes fail on every rank."""
import datetime
import math
import os
import socket
import tempfile
import threading
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from mvptr_ds.objectives import itm_loss, vsc_loss
from mvptr_ds.objectives.itm import negative_pairs
from objective_fixtures import FakeCrossModel, fake_outputs, make_batch

WORLD, B = 2, 3
TIMEOUT_S = 90


def vsc_case():
    """4 unit text/visual embeddings; pairs 0 (rank 0) and 4 (rank 1) share an image across ranks."""
    g = torch.Generator().manual_seed(11)
    t = F.normalize(torch.randn(WORLD * B, 8, generator=g), dim=-1)
    v = F.normalize(torch.randn(WORLD * B, 8, generator=g), dim=-1)
    v[4] = F.normalize(t[0] + 0.1 * v[4], dim=0)  # a same-image pair that would be a strong negative
    return t, v, torch.tensor([10, 11, 12, 13, 10, 14]), torch.tensor(math.log(1 / 0.07))


def itm_case(rank):
    """Rank ``rank``'s batch and outputs; the two ranks' batches have different text/region lengths."""
    ids = [[20, 21, 22], [23, 20, 24]][rank]
    batch = make_batch(ids, [[6, 8, 5], [7, 5, 6]][rank], [1, 2, 0], [[2, 3, 1], [4, 2, 1]][rank], seed=rank)
    outs = fake_outputs(batch, seed=30 + rank)
    if rank == 1:  # make rank 0's text 0 closest to an image of rank 1 (pair 5, another image)
        other = fake_outputs(itm_case_batch0(), seed=30)
        with torch.no_grad():
            outs.visual_embed[2] = F.normalize(other.text_embed[0] + 0.05, dim=0)
    return batch, outs


def itm_case_batch0():
    return make_batch([20, 21, 22], [6, 8, 5], [1, 2, 0], [2, 3, 1], seed=0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def itm_head():
    torch.manual_seed(5)
    return nn.Linear(8, 2)


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    from mvptr_ds.training.gather import GatherShapeError, global_gather_fn
    try:
        gather = global_gather_fn()
        assert gather is not None and gather.rank == rank and gather.world_size == WORLD
        result = {}
        t, v, ids, tau = vsc_case()
        rows = slice(rank * B, (rank + 1) * B)
        t, v = t[rows].clone().requires_grad_(), v[rows].clone().requires_grad_()
        tau = tau.clone().requires_grad_()
        out = vsc_loss(t, v, ids[rows], tau, gather=gather)
        out.loss.backward()
        result["vsc"] = (out.loss.detach(), t.grad, v.grad, tau.grad)

        batch, outs = itm_case(rank)
        head = itm_head()
        model = FakeCrossModel()
        out = itm_loss(outs, batch, model, head, gather=gather)
        out.loss.backward()
        result["itm"] = (out.loss.detach(), outs.text.grad, outs.visual.grad, outs.pooled.grad, head.weight.grad,
                         model.calls[0][1])
        try:
            gather(torch.zeros(rank + 1, 2))
            result["shape_error"] = False
        except GatherShapeError:
            result["shape_error"] = True
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks():
    """Run the 2-rank worker once; return each rank's results. Never hangs: killed after TIMEOUT_S."""
    with tempfile.TemporaryDirectory() as d:
        ctx = mp.start_processes(_worker, args=(free_port(), d), nprocs=WORLD, join=False, start_method="spawn")
        deadline = time.monotonic() + TIMEOUT_S
        try:
            while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
                if time.monotonic() > deadline:
                    pytest.fail(f"2-rank run did not finish within {TIMEOUT_S} s")
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        return [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]


def test_global_vsc_equals_single_process_on_concatenated_batch(ranks):
    t, v, ids, tau = vsc_case()
    t, v, tau = t.clone().requires_grad_(), v.clone().requires_grad_(), tau.clone().requires_grad_()
    single = vsc_loss(t, v, ids, tau)
    single.loss.backward()
    # DeepSpeed averages over ranks: the mean of the rank losses/gradients is the single-process value.
    assert torch.stack([r["vsc"][0] for r in ranks]).mean().item() == pytest.approx(single.loss.item(), rel=1e-6)
    for r in range(WORLD):
        rows = slice(r * B, (r + 1) * B)
        assert torch.allclose(ranks[r]["vsc"][1] / WORLD, t.grad[rows], atol=1e-6)
        assert torch.allclose(ranks[r]["vsc"][2] / WORLD, v.grad[rows], atol=1e-6)
    assert torch.stack([r["vsc"][3] for r in ranks]).mean().item() == pytest.approx(tau.grad.item(), rel=1e-5)
    # Without the cross-rank exclusion of image 10 (pairs 0 and 4) the loss would differ.
    assert abs(vsc_loss(t, v, torch.arange(6), tau).loss.item() - single.loss.item()) > 1e-3


class ThreadGather:
    """Both 'ranks' in one process, one thread each: the gather concatenates the live tensors, so one
    backward of the summed losses gives each rank's tensors the sum over ranks of the gradients."""

    def __init__(self, rank, shared):
        self.rank, self.world_size, self.shared = rank, WORLD, shared

    def __call__(self, t):
        self.shared["slots"][self.rank] = t
        self.shared["barrier"].wait()
        out = torch.cat(list(self.shared["slots"]), dim=0)
        self.shared["barrier"].wait()
        return out


def test_global_itm_equals_in_process_emulation(ranks):
    shared = {"slots": [None] * WORLD, "barrier": threading.Barrier(WORLD, timeout=30)}
    cases = [itm_case(r) for r in range(WORLD)]
    head = itm_head()
    models = [FakeCrossModel() for _ in range(WORLD)]
    losses = [None] * WORLD

    def run(r):
        losses[r] = itm_loss(cases[r][1], cases[r][0], models[r], head, gather=ThreadGather(r, shared)).loss

    threads = [threading.Thread(target=run, args=(r,)) for r in range(WORLD)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    sum(losses).backward()
    for r in range(WORLD):
        loss, g_text, g_visual, g_pooled, g_head, neg_text_mask = ranks[r]["itm"]
        outs = cases[r][1]
        assert loss.item() == pytest.approx(losses[r].item(), rel=1e-6)
        assert torch.allclose(g_text, outs.text.grad, atol=1e-6)
        assert torch.allclose(g_visual, outs.visual.grad, atol=1e-6)
        assert torch.allclose(g_pooled, outs.pooled.grad, atol=1e-6)
    assert torch.allclose(ranks[0]["itm"][4] + ranks[1]["itm"][4], head.weight.grad, atol=1e-6)
    # Mining really is global: rank 0's text 0 is paired with an image held by rank 1.
    te = torch.cat([c[1].text_embed for c in cases]).detach()
    ve = torch.cat([c[1].visual_embed for c in cases]).detach()
    ids = torch.cat([c[0].image_ids for c in cases])
    _, image_idx, _ = negative_pairs(te[:B] @ ve.t(), ve[:B] @ te.t(), ids[:B], ids, 0, cases[0][0].itm_text_side)
    assert int(image_idx[0]) >= B
    # And rank 1's own gradient received a contribution from rank 0's loss (through the gather's backward).
    assert cases[1][1].visual.grad.abs().sum() > 0


def test_gather_shape_mismatch_raises_on_every_rank(ranks):
    assert all(r["shape_error"] for r in ranks)
