"""Run a loss on several CPU processes (gloo) and average its gradients as DDP does, for the equivalence tests
"W processes = one process on the concatenated batch"."""

import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank, world, init_file, out_path, loss_and_grads):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    loss, grads = loss_and_grads(rank, world)
    # DDP averages parameter gradients over processes; so do we, and likewise for the logged loss.
    for grad in grads:
        dist.all_reduce(grad)
        grad /= world
    dist.all_reduce(loss := loss.detach().clone())
    if rank == 0:
        torch.save({"loss": loss / world, "grads": list(grads)}, out_path)
    dist.barrier()
    dist.destroy_process_group()


def averaged_over_processes(loss_and_grads, world: int = 2) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """loss_and_grads(rank, world) -> (loss, grads) of that rank's share of the batch, a module-level function (it is
    pickled into the spawned processes). Returns the loss and gradients averaged over the ranks."""
    with tempfile.TemporaryDirectory() as tmp:
        out_path = os.path.join(tmp, "result.pt")
        mp.spawn(_worker, args=(world, os.path.join(tmp, "init"), out_path, loss_and_grads), nprocs=world, join=True)
        result = torch.load(out_path)
    return result["loss"], result["grads"]


def seeded_linears(generator: torch.Generator, *shapes: tuple[int, int]) -> list[torch.nn.Linear]:
    """Small encoders with N(0, 1) weights drawn from `generator`: identical in every process that seeds it alike."""
    layers = [torch.nn.Linear(*shape) for shape in shapes]
    with torch.no_grad():
        for parameter in (p for layer in layers for p in layer.parameters()):
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return layers
