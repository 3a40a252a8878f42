"""hierloc.training.syncs: the host-sync counter, and the counts of the training loss and step it guards."""

from __future__ import annotations

import torch

from hierloc.training.syncs import count_host_syncs, syncs_per_step


def test_one_item_counts_one():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        y = (x * 2).sum()
        y.item()
    assert syncs.count == 1
    assert syncs.events[0][0] == "aten._local_scalar_dense"
    assert syncs.events[0][1].endswith(f"test_syncs.py:{test_one_item_counts_one.__code__.co_firstlineno + 4}")


def test_float_bool_and_tolist_each_count_one():
    x = torch.arange(6.0)
    with count_host_syncs() as syncs:
        float(x[2])
        bool((x > 2).any())
        x[:3].tolist()
    assert [name for name, _ in syncs.events] == ["aten._local_scalar_dense", "aten._local_scalar_dense",
                                                 "Tensor.tolist"]
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]  # the method is restored afterwards


def test_data_dependent_shapes_count_one_each():
    x = torch.tensor([0.0, 3.0, 0.0, 5.0])
    with count_host_syncs() as syncs:
        x.nonzero()
    assert syncs.count == 1
    with count_host_syncs() as syncs:
        x[x > 1]                                   # boolean-mask indexing runs nonzero inside
        x.masked_select(x > 1)
        torch.unique(x)
        torch.repeat_interleave(torch.tensor([1, 2]))
        torch.equal(x, x)
    assert [name for name, _ in syncs.events] == ["aten.index", "aten.masked_select", "aten._unique2",
                                                 "aten.repeat_interleave", "aten.equal"]


def test_pure_arithmetic_and_shape_static_ops_count_zero():
    x = torch.randn(5, 4, requires_grad=True)
    with count_host_syncs() as syncs:
        y = torch.where(x > 0, x.exp(), x.square()).sum(dim=1)
        y = y.index_select(0, torch.tensor([0, 2])).sum() + x[torch.tensor([1, 3])].sum()
        torch.nonzero_static(x.detach() > 0, size=3)
        torch.repeat_interleave(torch.tensor([1, 2]), torch.tensor([2, 1]), output_size=3)
        y.backward()
    assert syncs.count == 0


def test_optimizer_step_counts_of_torch_optim_are_left_out():
    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.AdamW([w], lr=0.1)
    w.sum().backward()
    with count_host_syncs() as syncs:
        opt.step()
    assert syncs.count == 0
    assert "step" in opt.state[w]  # (the step ran)


def test_syncs_per_step_counts_one_call_after_warm_up():
    calls = []

    def step():
        calls.append(1)
        x = torch.ones(3)
        if len(calls) == 1:  # a lazy first call (warm-up) with more reads
            x.sum().item()
        x.sum().item()

    assert syncs_per_step(step, warmup=1, steps=2) == 1
    assert len(calls) == 3
