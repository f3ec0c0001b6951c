r"""Starting the ranks: under torchrun, and ``hmoe train --nproc N`` which runs torchrun.

``torchrun --nproc_per_node N -m hmoe train --config ...`` starts N processes with RANK,
WORLD_SIZE and the rendezvous in their environment; :func:`init_ranks` joins them into one
process group: gloo on CPU, nccl on CUDA (each rank on the GPU of its LOCAL_RANK).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from hmoe.distributed import require

__all__ = ["Ranks", "broadcast", "close_ranks", "init_ranks", "launch", "world_size_from_env"]


@dataclass(frozen=True)
class Ranks:
    """This process's place among the ranks of a run."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def main(self) -> bool:
        """Rank 0 writes the run directory; the others only compute."""
        return self.rank == 0


def world_size_from_env() -> int:
    """WORLD_SIZE as torchrun sets it (1 outside torchrun)."""
    value = os.environ.get("WORLD_SIZE", "1")
    try:
        size = int(value)
    except ValueError:
        raise ValueError(f"WORLD_SIZE must be an integer, got {value!r}") from None
    if size < 1:
        raise ValueError(f"WORLD_SIZE must be >= 1, got {size}")
    return size


def init_ranks() -> Ranks | None:
    """Joins the process group torchrun describes; None for a single process."""
    world = world_size_from_env()
    if world == 1:
        return None
    require()
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        backend, device = "nccl", torch.device("cuda", local)
    else:
        backend, device = "gloo", torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def close_ranks() -> None:
    """Leaves the process group once every rank is done (a barrier, then destroy). A process
    that exits with the group still open can abort in its teardown ("terminate called without
    an active exception"), failing a job that finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def broadcast(value: Any) -> Any:
    """Rank 0's ``value`` on every rank (any picklable object)."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Runs ``hmoe <argv>`` on ``nproc`` ranks of this machine through torchrun; its exit
    status (non-zero when any rank fails: torchrun then stops the others)."""
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise ValueError(f"--nproc must be an int >= 1, got {nproc!r}")
    require()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", str(nproc), "-m", "hmoe", *argv]
    return subprocess.call(command)
