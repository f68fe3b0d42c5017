"""Setting up one rank's process groups (``torch.distributed``): NCCL on GPUs, gloo on the CPU.

Every rank calls :func:`init_rank` with the same rendezvous address; it returns the rank's
:class:`ModelParallel` (its tensor-parallel group and pipeline stage) and a gloo group over all
ranks for the driver's control messages (step plans travel there as CPU bytes, never through
the device collectives).
"""

from __future__ import annotations

import datetime
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from gpu_worker.distributed.parallel_state import ModelParallel, ParallelConfig, TensorParallelGroup

# Collectives block while a peer computes: a long prefill must not look like a dead peer. A dead
# rank is noticed by the driver's watchdog (its process exits), not by this timeout.
_COLLECTIVE_TIMEOUT = datetime.timedelta(hours=2)


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the rendezvous port when none is configured)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class RankSetup:
    """Where a rank runs and how it finds the others."""

    parallel: ParallelConfig
    rank: int
    init_method: str  # tcp://host:port of the rendezvous store
    device: torch.device

    @property
    def backend(self) -> str:
        return "nccl" if self.device.type == "cuda" else "gloo"


def rank_device(base: torch.device, rank: int) -> torch.device:
    """Rank ``rank``'s device: ``cuda:rank`` on GPUs (one device per rank), else the CPU."""
    return torch.device("cuda", rank) if base.type == "cuda" else torch.device("cpu")


def init_rank(setup: RankSetup) -> tuple[ModelParallel, Any]:
    """Join the process group; returns (this rank's ModelParallel, the gloo control group)."""
    if setup.device.type == "cuda":
        torch.cuda.set_device(setup.device)
    config = setup.parallel
    dist.init_process_group(
        setup.backend, init_method=setup.init_method, rank=setup.rank, world_size=config.world_size,
        timeout=_COLLECTIVE_TIMEOUT,
    )
    tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
    pp_rank, tp_rank = divmod(setup.rank, tp_size)
    tp_group: TensorParallelGroup | None = None
    for stage in range(pp_size):  # every rank creates every group, in the same order
        ranks = [config.rank_of(t, stage) for t in range(tp_size)]
        group = dist.new_group(ranks) if tp_size > 1 else None
        if stage == pp_rank:
            tp_group = TensorParallelGroup(tp_rank, tp_size, group, tuple(ranks))
    control = dist.new_group(backend="gloo")
    assert tp_group is not None  # invariant: pp_rank < pp_size
    return ModelParallel(tp_group, pp_rank, pp_size), control


def destroy() -> None:
    """Leave the process group (best effort: peers may be gone already)."""
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - shutting down; nothing to report to
            pass
