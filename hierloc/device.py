"""Device, precision and process-group handling: the one place that knows about CUDA and torch.distributed.

Everything else asks this module for the device, the autocast context and the rank; nothing else calls
``torch.cuda`` or ``torch.distributed.init_process_group``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from hierloc.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Runtime:
    """Where this process computes: device, and its place in a (possibly single-process) group."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda:<local_rank> when available, else cpu; 'cuda' without a GPU is a clear error."""
    name = (name or "auto").lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("--device cuda: no CUDA device is available on this machine; use --device cpu")
        return torch.device("cuda", local_rank if name == "cuda" else int(name.split(":")[1]))
    if name == "cpu":
        return torch.device("cpu")
    raise InputError(f"--device {name!r}: expected auto, cpu or cuda")


# How long a collective waits for the slowest rank before the job fails. torch's default (10 min) is shorter than a
# frozen backbone's feature extraction over a large dataset, after which the ranks meet at a barrier.
PROCESS_GROUP_TIMEOUT = timedelta(hours=2)


def init_runtime(device: str = "auto") -> Runtime:
    """Set up this process. Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.distributed.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def shard_bounds(n_rows: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, stop) rows of `rank` when n_rows are split over world_size ranks: contiguous, in rank order, sizes
    differ by at most one (feature extraction, validation and calibration all split this way)."""
    return n_rows * rank // world_size, n_rows * (rank + 1) // world_size


def all_gather_objects(runtime: Runtime, value: Any) -> list:
    """Every rank's `value` (picklable), in rank order, on every rank ([value] in a single process). A collective:
    every rank of the group must call it (gloo and NCCL)."""
    if not (runtime.distributed and torch.distributed.is_initialized()):
        return [value]
    values: list = [None] * runtime.world_size
    torch.distributed.all_gather_object(values, value)
    return values


_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # glibc's mallopt parameter numbers (malloc.h)


def reuse_freed_cpu_memory() -> bool:
    """Make glibc keep freed memory for reuse: no mmap for large blocks (M_MMAP_MAX = 0) and no trimming of the
    heap below 2 GB of free top (M_TRIM_THRESHOLD). Returns whether it was applied (False off Linux/glibc).

    By default every allocation above 32 MB is a fresh mmap, so each large temporary - a (B, N) logit matrix or an
    (E, D) optimiser intermediate - pays its page faults and zero-filling again, every step. Keeping the memory
    makes those re-allocations free (1.9x faster training steps at global scale, measured); the price is that the
    process holds on to its peak memory until it exits. Affects allocations made after the call.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (e.g. musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    applied = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("glibc mallopt (keep freed memory): %s", "applied" if applied else "refused")
    return applied


def pin_memory_for(device: torch.device | str) -> bool:
    """Whether a DataLoader feeding `device` should return page-locked batches: only for CUDA, where pinned host
    memory lets `to_device` copy asynchronously (elsewhere pinning only costs a copy)."""
    return torch.device(device).type == "cuda"


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A host tensor on `device`. The copy is non-blocking for a CUDA target (it overlaps with the host's work when
    the tensor is pinned; the stream orders it before any kernel that reads it); a no-op when already there."""
    device = torch.device(device)
    return tensor.to(device, non_blocking=device.type == "cuda")


def encoder_autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast for the image encoder on CUDA; a no-op elsewhere. Hyperbolic maths never runs under it."""
    if enabled and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
