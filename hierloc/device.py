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
    restarts: int = 0          # how many times torchrun has restarted the job (--max-restarts); 0 on the first run

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


def launch_rank() -> int:
    """This process's rank as torchrun set it (RANK), 0 when not launched by torchrun; readable before the process
    group exists (the CLI configures logging with it)."""
    return int(os.environ.get("RANK", "0"))


def init_runtime(device: str = "auto") -> Runtime:
    """Set up this process. Under torchrun (WORLD_SIZE > 1) joins the process group: NCCL on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = launch_rank()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    log_from_main_only(rank)
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if "TORCHELASTIC_RESTART_COUNT" in os.environ:     # started by torchrun's agent: keys of this attempt
            torch.distributed.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT,
                                                 store=_attempt_store(rank, world_size), rank=rank,
                                                 world_size=world_size)
        else:
            torch.distributed.init_process_group(backend=backend, timeout=PROCESS_GROUP_TIMEOUT)
        log.info("joined process group: rank %d of %d (%s)", rank, world_size, backend)
    return Runtime(device=dev, rank=rank, world_size=world_size, local_rank=local_rank,
                   restarts=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def _attempt_store(rank: int, world_size: int) -> torch.distributed.Store:
    """The key-value store the process group meets in, with keys private to this attempt of the job.

    torchrun's agent keeps one store across `--max-restarts` attempts; with env:// the restarted processes can read
    the addresses the previous attempt's processes published and fail to connect ("Connection refused", seen with
    gloo). Prefixing every key with the attempt number (TORCHELASTIC_RESTART_COUNT) keeps attempts apart. The store
    is the one env:// would open: a client of the agent's store under torchrun, else hosted by rank 0."""
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = torch.distributed.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size,
        is_master=not agent_store and rank == 0, timeout=PROCESS_GROUP_TIMEOUT, multi_tenant=not agent_store)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return torch.distributed.PrefixStore(f"hierloc/attempt-{attempt}", base)


def launcher_command() -> list[str]:
    """The torchrun command (without its script) that started this process with its process counts:
    ["torchrun", "--nnodes", N, "--nproc_per_node", P] ([] when not started by torchrun). Rendezvous options of a
    multi-node job are not visible to a worker and are left out."""
    if "TORCHELASTIC_RUN_ID" not in os.environ and int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return []
    nodes = os.environ.get("GROUP_WORLD_SIZE", "1")
    head = ["torchrun"] + (["--nnodes", nodes] if nodes != "1" else ["--standalone"])
    return head + ["--nproc_per_node", os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1"))]


def is_lost_peer(error: BaseException) -> bool:
    """Whether `error`, raised by a collective, means another process of the job is gone (killed, crashed, its
    machine lost): torch.distributed's errors, and gloo's and NCCL's runtime errors about the connection."""
    if isinstance(error, torch.distributed.DistError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        marker in text for marker in ("gloo/transport", "Connection reset", "Connection closed", "Broken pipe",
                                      "NCCL communicator", "ncclRemoteError", "ncclSystemError"))


# The packages whose loggers only rank 0 lets through below WARNING.
LOGGED_PACKAGES = ("hierloc", "gazetteer")


def log_from_main_only(rank: int) -> None:
    """On ranks other than 0, raise the project's loggers to WARNING: N ranks would otherwise print every info line
    N times; warnings and errors still come from every rank. A no-op on rank 0."""
    if rank == 0:
        return
    for name in LOGGED_PACKAGES:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.WARNING:
            logger.setLevel(logging.WARNING)


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed and torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(runtime: Runtime, tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over the ranks (itself in a single process), on the tensor's device: the
    reduction runs on the runtime's device (NCCL reduces CUDA tensors only)."""
    if not (runtime.distributed and torch.distributed.is_initialized()):
        return tensor
    work = tensor.to(runtime.device).contiguous()
    torch.distributed.all_reduce(work)
    return work.to(tensor.device)


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
