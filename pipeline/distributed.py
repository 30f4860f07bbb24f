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
equal, so the masks must be equal too; ``check_same_masks`` (called by the distillation modifier
as training ends, on every rank) is a guard that they stayed so, and stops the run where not.

Only ``sparsebert train`` runs under torchrun; the other commands refuse it.
"""

from __future__ import annotations

import datetime
import hashlib
import os

from sparsebert.errors import UserError

# Rank 0 works alone between stages (measures the teacher, labels augmented data) and inside
# them (tokenizes while the others wait at a barrier), so no collective times out early; a rank
# that fails exits, and torchrun stops the others.
WAIT = datetime.timedelta(hours=12)
_handoff = None  # the group the stages are sent on (gloo: Python objects on the CPU, whatever trains)
_in_stage = False  # rank 0 sent a stage the others are running


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
    send the stages; the Trainer uses the group it finds), each process on its own GPU."""
    import torch
    import torch.distributed as dist

    global _handoff
    if not active():
        return
    if torch.cuda.is_available():  # a scheduler may show each process its one GPU only
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=WAIT)
    _handoff = dist.new_group(backend="gloo", timeout=WAIT)


def per_rank_batch(batch_size: int) -> int:
    size = world_size()
    if batch_size % size:
        raise DistributedError(f"--batch-size {batch_size} does not split over {size} processes: "
                               f"pass a multiple of {size}")
    return batch_size // size


def send_stage(arguments: dict) -> None:
    """Rank 0: the next stage's arguments to the other ranks, who train it beside rank 0."""
    global _in_stage
    if _handoff is not None:
        _broadcast(arguments)
        _in_stage = True


def stage_done() -> None:
    global _in_stage
    _in_stage = False


def finish(failed: bool) -> None:
    """Rank 0, at the end of the run: tell the others to stop. Not when it failed inside a stage:
    they are in that stage's collectives and would wait for rank 0 until the timeout; rank 0 exits
    instead, and torchrun stops them."""
    if _handoff is not None and not (failed and _in_stage):
        _broadcast(None)


def follow(run_stage) -> None:
    """Ranks other than 0: run each stage rank 0 sends, until it sends None."""
    while True:
        arguments = _broadcast(None)
        if arguments is None:
            return
        run_stage(arguments)


def _broadcast(arguments: dict | None) -> dict | None:
    import torch.distributed as dist

    message = [arguments]
    dist.broadcast_object_list(message, src=0, group=_handoff)
    return message[0]


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
