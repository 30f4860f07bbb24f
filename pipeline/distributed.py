"""Training past one process: ``sparsebert train`` under ``torchrun`` (DDP; NCCL on GPUs, gloo on
CPUs), e.g. ``torchrun --nproc-per-node 8 -m sparsebert.cli train --task mrpc --out runs/mrpc``.

Rank 0 runs the stage as one process does: it prepares the data, owns the run folder, measures
and writes every file. The other ranks only train: before each training stage rank 0 sends them
the stage's arguments for SparseML's script (the same files, so the run folder must be on storage
every rank reads, as with any DDP job), and they run it beside it; the Hugging Face Trainer
inside makes it data-parallel (each rank a share of every batch, gradients averaged). When the
run ends, rank 0 tells them to stop. The global batch stays ``--batch-size``: each rank takes
``batch_size / world_size`` of it, so a run has the same steps, schedule and learning rate on
any number of processes.

Masks: gradual magnitude pruning cuts each rank's copy of the weights, and DDP keeps the copies
equal, so the masks must be equal too; ``check_same_masks`` checks that on every rank at the end of
training and stops the run where they differ.
"""

from __future__ import annotations

import datetime
import hashlib
import os

from sparsebert.errors import UserError

# Rank 0 measures the teacher between stages while the others wait for the next one.
WAIT = datetime.timedelta(hours=12)


class DistributedError(UserError):
    pass


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def active() -> bool:
    return world_size() > 1


def start() -> None:
    """Join the process group torchrun describes (before the Trainer would, so that rank 0 can
    send the stages; the Trainer uses the group it finds)."""
    import torch
    import torch.distributed as dist

    if active() and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)


def per_rank_batch(batch_size: int) -> int:
    size = world_size()
    if batch_size % size:
        raise DistributedError(f"--batch-size {batch_size} does not split over {size} processes: "
                               f"pass a multiple of {size}")
    return batch_size // size


def send_stage(arguments: dict | None) -> None:
    """Rank 0: the next stage's arguments to the other ranks (None: the run is over)."""
    import torch.distributed as dist

    if active() and dist.is_initialized():
        dist.broadcast_object_list([arguments], src=0)


def follow(run_stage) -> None:
    """Ranks other than 0: run each stage rank 0 sends, until it sends None."""
    import torch.distributed as dist

    while True:
        message = [None]
        dist.broadcast_object_list(message, src=0)
        if message[0] is None:
            return
        run_stage(message[0])


def masks_digest(module, patterns: list[str]) -> str:
    """SHA-256 over where the pruned matrices are zero, in parameter order."""
    from sparsebert.checkpoint import is_pruned

    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if is_pruned(name, patterns):
            digest.update(name.encode())
            digest.update((param.detach() == 0).cpu().numpy().tobytes())
    return digest.hexdigest()


def check_same_masks(module, patterns: list[str]) -> str | None:
    """Every rank's pruning masks, compared on every rank; stops the run where they differ.
    Returns the digest (None when not distributed)."""
    import torch.distributed as dist

    if not (active() and dist.is_initialized()):
        return None
    mine = masks_digest(module, patterns)
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, mine)
    if len(set(every)) != 1:
        raise RuntimeError(f"the ranks ended training with different pruning masks: {every}")
    if dist.get_rank() == 0:
        print(f"[sparsebert] pruning masks identical on all {len(every)} ranks (sha256 {mine})", flush=True)
    return mine
