"""The global InfoNCE over 2 processes (gloo on CPU) equals the single-process loss on the concatenated batch,
values and gradients (with DDP's gradient averaging)."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from plan_hf.losses_plan import global_contrastive_loss

WORLD = 2
BATCH = 3  # per process


def make_problem():
    """Two small encoders (image, text) and a batch of WORLD * BATCH pairs, identical in every process."""
    g = torch.Generator().manual_seed(0)
    image_encoder = torch.nn.Linear(6, 5)
    text_encoder = torch.nn.Linear(7, 5)
    with torch.no_grad():
        for p in list(image_encoder.parameters()) + list(text_encoder.parameters()):
            p.copy_(torch.randn(p.shape, generator=g))
    images = torch.randn(WORLD * BATCH, 6, generator=g)
    texts = torch.randn(WORLD * BATCH, 7, generator=g)
    logit_scale = torch.tensor(2.3, requires_grad=True)
    return image_encoder, text_encoder, images, texts, logit_scale


def loss_and_grads(image_encoder, text_encoder, images, texts, logit_scale):
    v = F.normalize(image_encoder(images), dim=-1)
    t = F.normalize(text_encoder(texts), dim=-1)
    loss = global_contrastive_loss(v, t, logit_scale.exp())
    params = list(image_encoder.parameters()) + list(text_encoder.parameters()) + [logit_scale]
    return loss, torch.autograd.grad(loss, params)


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    image_encoder, text_encoder, images, texts, logit_scale = make_problem()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    loss, grads = loss_and_grads(image_encoder, text_encoder, images[rows], texts[rows], logit_scale)
    # DDP averages parameter gradients over processes; so do we, and likewise for the logged loss.
    for grad in grads:
        dist.all_reduce(grad)
        grad /= WORLD
    dist.all_reduce(loss := loss.detach().clone())
    if rank == 0:
        torch.save({"loss": loss / WORLD, "grads": grads}, os.path.join(out_dir, "dist.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_two_process_global_loss_equals_single_process():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD, join=True)
        distributed = torch.load(os.path.join(tmp, "dist.pt"))
    loss, grads = loss_and_grads(*make_problem())
    torch.testing.assert_close(distributed["loss"], loss.detach())
    assert len(grads) == len(distributed["grads"])
    for expected, got in zip(grads, distributed["grads"]):
        torch.testing.assert_close(got, expected)
