"""The global InfoNCE over 2 processes (gloo on CPU) equals the single-process loss on the concatenated batch,
values and gradients (with DDP's gradient averaging)."""

import torch
import torch.nn.functional as F

from plan_hf.losses_plan import global_contrastive_loss
from tests.multiprocess import averaged_over_processes, seeded_linears

WORLD = 2
BATCH = 3  # per process


def make_problem():
    """Two small encoders (image, text) and a batch of WORLD * BATCH pairs, identical in every process."""
    g = torch.Generator().manual_seed(0)
    image_encoder, text_encoder = seeded_linears(g, (6, 5), (7, 5))
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


def rank_loss_and_grads(rank, world):
    image_encoder, text_encoder, images, texts, logit_scale = make_problem()
    rows = slice(rank * BATCH, (rank + 1) * BATCH)
    return loss_and_grads(image_encoder, text_encoder, images[rows], texts[rows], logit_scale)


def test_two_process_global_loss_equals_single_process():
    distributed_loss, distributed_grads = averaged_over_processes(rank_loss_and_grads, WORLD)
    loss, grads = loss_and_grads(*make_problem())
    torch.testing.assert_close(distributed_loss, loss.detach())
    assert len(grads) == len(distributed_grads)
    for expected, got in zip(grads, distributed_grads):
        torch.testing.assert_close(got, expected)
