"""Several processes, one global batch: what training needs beyond ``accelerate`` to scale.

``accelerate launch --multi_gpu --num_processes N -m vlmcourse train ...`` (or ``torchrun --nproc_per_node N``)
starts N copies of the program. Each draws the same global batch (same seed), keeps its own rows (``shard``:
rows rank, rank + N, ...), and DDP averages the gradients. Two things must then be global, not per process:

- BLIP-2's contrastive loss compares each image with every caption of the *global* batch, and ITM draws its hard
  negatives from it: ``gather`` collects every process's features, in the global batch's order. Its gradient
  flows back to the process that owns each row, summed over the processes (each computed its loss from all
  rows), so N processes compute the gradient of one process on the whole batch. LAVIS's BLIP-2 gathers the ITC
  features without gradient (``concat_all_gather``) and loses that part; it gathers the ITM images with
  gradient (``all_gather_with_grad``), as here. (torch.distributed.nn.functional.all_gather, deprecated, gave
  wrong gradients over gloo here: tests/test_distributed.py catches that.)
- a mean over tokens: processes hold different numbers of caption tokens, so each returns its share of the
  global mean (``global_mean``).

In a single process (no process group) every function here is the identity, so the numbers stay bit for bit
those of the code before it existed.
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


def launched_processes() -> int:
    """How many processes the launcher (torchrun, ``accelerate launch``) started, before any group exists."""
    return int(os.environ.get("WORLD_SIZE", 1))


def check_launch() -> None:
    """``accelerate launch --cpu --num_processes N`` starts ONE process unless MPI is set up (accelerate's CPU
    launcher runs several only through mpirun); say so instead of silently training on one."""
    if (os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") and os.environ.get("MASTER_ADDR")
            and launched_processes() == 1 and not any(os.environ.get(k) for k in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))):
        raise RuntimeError("accelerate launch --cpu started a single process: without MPI it cannot start several. "
                           "Use accelerate launch --multi_gpu --num_processes N (torchrun underneath; on a machine "
                           "without GPUs the processes talk over gloo), or torchrun --nproc_per_node N.")


def accelerator_kwargs() -> dict:
    """``Accelerator``'s arguments. Processes started by a launcher on a machine without a GPU need ``cpu=True``
    (accelerate then joins them over gloo); one process keeps accelerate's own choice of device. DDP must look
    for parameters without a gradient (stage 2 trains the Q-Former's queries, never its text layers; a stage-1
    model can train on some of its losses), else it waits for them forever."""
    if launched_processes() == 1:
        return {}
    from accelerate.utils import DistributedDataParallelKwargs

    return {"kwargs_handlers": [DistributedDataParallelKwargs(find_unused_parameters=True)],
            "cpu": not torch.cuda.is_available()}


def init() -> None:
    """Join the launcher's process group now (``train`` would, later): the main process can then fill the
    caches first (``main_process_first``). Nothing happens in a single process."""
    check_launch()
    if launched_processes() > 1:
        from accelerate import PartialState

        PartialState(cpu=accelerator_kwargs()["cpu"])


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


@contextmanager
def main_process_first():
    """The main process runs the block first (filling caches: image features, the converted LLM), the others
    after it (reading them): two processes writing one cache file would collide."""
    if not is_main_process():
        barrier()
    try:
        yield
    finally:
        if is_main_process():
            barrier()


def own_rows(x):
    """This process's rows of a global-batch tensor or list: rows rank, rank + N, ... (the identity in one process).

    Interleaved, not contiguous: the first k rows of the global batch (ITM's positives) fall evenly on the processes.
    """
    n = world_size()
    if n == 1:
        return x
    if len(x) % n:
        raise ValueError(f"a global batch of {len(x)} rows does not split over {n} processes: "
                         f"choose a batch size that is a multiple of {n}")
    return x[rank()::n]


def local_rows(n: int) -> torch.Tensor | None:
    """Global indices of this process's rows in a global batch of ``n`` (None in one process: all of them)."""
    return None if world_size() == 1 else own_rows(torch.arange(n))


def shard(batch):
    """This process's part of a batch from ``batch_fn``: ``own_rows`` of every tensor and list, through dicts and
    tuples; anything else (the step's generator) as is."""
    if world_size() == 1:
        return batch
    if isinstance(batch, dict):
        return {k: shard(v) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(shard(v) for v in batch)
    if isinstance(batch, (list, torch.Tensor)):
        return own_rows(batch)
    return batch


def _interleave(parts: list) -> list:
    """Process 0's rows, process 1's rows, ... back into the global order (row i came from process i % N)."""
    return [x for group in zip(*parts) for x in group]


class _AllGather(torch.autograd.Function):
    """all_gather with a gradient (LAVIS's GatherLayer): every process's rows, process by process; backward sums
    each row's gradient over the processes (each computed its own loss from all rows) and hands a process its own."""

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()      # a collective reads the memory as laid out
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def gather(x: torch.Tensor) -> torch.Tensor:
    """(B/N, ...) rows of every process -> (B, ...) in the global batch's order, with gradient to each owner."""
    n = world_size()
    if n == 1:
        return x
    return _AllGather.apply(x).unflatten(0, (n, -1)).transpose(0, 1).flatten(0, 1)   # row i from process i % N


def gather_objects(items: list) -> list:
    """The lists (captions, image ids) of every process, in the global batch's order (no gradient)."""
    if world_size() == 1:
        return items
    parts = [None] * world_size()
    dist.all_gather_object(parts, list(items))
    return _interleave(parts)


def global_mean(mean: torch.Tensor, count) -> torch.Tensor:
    """This process's share of a mean over every process's items, from its own mean over ``count`` items.

    sum_local * N / count_global: DDP averages the N processes' gradients, which then equal the gradient of
    the mean over the global batch, whatever the number of tokens each process holds.
    """
    n = world_size()
    if n == 1:
        return mean
    count = torch.as_tensor(count, dtype=torch.float64, device=mean.device)
    total = count.clone()
    dist.all_reduce(total)
    return mean * (count * n / total).to(mean.dtype)


def mean_over_processes(values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The mean of each (scalar) value over the processes, for the progress bar and the history; one process:
    the values themselves."""
    if world_size() == 1:
        return values
    stacked = torch.stack([v.detach().float().reshape(()) for v in values.values()])
    dist.all_reduce(stacked)
    return dict(zip(values, stacked / world_size()))
