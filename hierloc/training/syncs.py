"""Counting the device -> host synchronisations of a piece of training code, on any device (CI counts on the CPU).

A host sync is an operation whose result the host must have before it can go on, so on a GPU it waits for every
kernel queued before it: reading a value (``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``, ``if t:``,
``.tolist()``), and every op whose output *shape* depends on the data. ``count_host_syncs`` records them with a
``TorchDispatchMode`` (it sees the ATen ops below autograd, so backward's ops are seen too) and counts:

- ``aten._local_scalar_dense`` (what item / float / int / bool of a tensor dispatch to) and ``aten.is_nonzero``;
- data-dependent shapes: ``aten.nonzero``, ``aten.masked_select``, ``aten.unique*`` / ``aten._unique*``,
  ``aten.repeat_interleave`` with a tensor of repeats and no ``output_size``, indexing or index-assignment with a
  boolean mask (``aten.index`` / ``aten.index_put_`` with a bool index: the kernel runs nonzero on it);
- ``aten.equal`` (its answer is a Python bool);
- copies to the CPU from another device (``aten._to_copy`` to "cpu", ``aten.copy_`` into a CPU tensor): only
  where the source is not on the CPU, so a CPU-only run cannot see them (on the CPU ``t.cpu()`` is ``t``);
- ``Tensor.tolist()``: it reads the data without any ATen op, so while counting the method is wrapped and each
  call counts one.

Left out: reads of the step counts of ``torch.optim`` optimisers (a ``_local_scalar_dense`` of a CPU tensor asked
for from inside torch/optim): torch.optim keeps those counts on the CPU on every device (unless ``capturable``), so
they never wait for a GPU.

Not counted: ``nonzero_static`` and ``repeat_interleave`` with ``output_size`` (no sync), host -> device copies,
and ``Tensor.numpy()`` (a CPU tensor's view; on a GPU it needs ``.cpu()`` first, which is counted there). On the CPU
every other read of a tensor is counted, including reads of tensors that would stay on the CPU when training runs on
a GPU: ``SyncCount.events`` names each counted op and the source line that caused it, so such reads can be told
apart.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

_READS = {"_local_scalar_dense", "is_nonzero", "equal", "nonzero", "masked_select", "unique", "unique_dim",
          "unique_consecutive", "unique_dim_consecutive", "_unique", "_unique2"}


@dataclass
class SyncCount:
    """The syncs counted so far: ``count`` and one (op name, "file:line") per sync in ``events``."""

    events: list = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.events)

    def add(self, name: str, where: str) -> None:
        self.events.append((name, where))


def _caller() -> tuple[str, bool]:
    """(the innermost source line outside torch and this module, i.e. where the sync was asked for; whether the
    call comes from inside torch/optim)."""
    frame, where, in_optim = sys._getframe(1), None, False
    while frame is not None:
        name = frame.f_code.co_filename.replace("\\", "/")
        in_optim = in_optim or "/torch/optim/" in name
        if where is None and "/torch/" not in name and not name.endswith("/syncs.py") \
                and not name.endswith("/contextlib.py"):
            where = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return where or "?", in_optim


def _is_sync(func, args, kwargs) -> bool:
    """Whether the ATen op ``func`` called with (args, kwargs) needs the host to wait for the device."""
    name = func.overloadpacket.__name__
    if name in _READS:
        return True
    if name == "repeat_interleave":
        return isinstance(args[0], torch.Tensor) and (len(args) < 2 or isinstance(args[1], torch.Tensor)) \
            and kwargs.get("output_size") is None and func._overloadname != "self_int"
    if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
        indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
        return any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in indices)
    if name == "_to_copy":
        target = kwargs.get("device")
        return target is not None and torch.device(target).type == "cpu" and args[0].device.type != "cpu"
    if name == "copy_":
        return args[0].device.type == "cpu" and args[1].device.type != "cpu"
    return False


class _SyncMode(TorchDispatchMode):
    def __init__(self, counter: SyncCount) -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_sync(func, args, kwargs):
            where, in_optim = _caller()
            name = str(func.overloadpacket)
            if not (in_optim and name == "aten._local_scalar_dense" and args[0].device.type == "cpu"):
                self.counter.add(name, where)
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_host_syncs() -> Iterator[SyncCount]:
    """``with count_host_syncs() as syncs: ...`` -> ``syncs.count`` device -> host syncs in the block (see the
    module docstring for exactly what counts), ``syncs.events`` the op and source line of each."""
    counter = SyncCount()
    original = torch.Tensor.tolist

    def tolist(self):
        counter.add("Tensor.tolist", _caller()[0])
        return original(self)

    torch.Tensor.tolist = tolist
    try:
        with _SyncMode(counter):
            yield counter
    finally:
        torch.Tensor.tolist = original


def syncs_per_step(step_fn: Callable[[], object], warmup: int = 1, steps: int = 1) -> int:
    """Device -> host syncs of one call of ``step_fn`` (e.g. one whole training step: forward, backward, optimiser
    step and the loop's bookkeeping), on whatever device it runs: ``step_fn()`` is called ``warmup`` times
    uncounted (lazy state: optimiser moments, caches), then ``steps`` times counted -> the largest count of one
    call. A GPU check calls it with its own step; on a CPU the count is the one CI asserts (see the module
    docstring for what is and is not counted)."""
    for _ in range(warmup):
        step_fn()
    counts = []
    for _ in range(max(1, steps)):
        with count_host_syncs() as syncs:
            step_fn()
        counts.append(syncs.count)
    return max(counts)
