"""hierloc.device's loader helpers: pinning and non-blocking copies only for CUDA (asserted on device objects, not on
whatever device this machine has)."""

from __future__ import annotations

from unittest import mock

import pytest
import torch

from hierloc.device import pin_memory_for, to_device


@pytest.mark.parametrize("device, pinned", [(torch.device("cuda", 0), True), (torch.device("cuda"), True),
                                            ("cuda:1", True), (torch.device("cpu"), False),
                                            (torch.device("meta"), False)])
def test_pinning_is_requested_only_for_cuda(device, pinned):
    assert pin_memory_for(device) is pinned


@pytest.mark.parametrize("device, non_blocking", [(torch.device("cuda", 0), True), (torch.device("cpu"), False),
                                                  (torch.device("meta"), False)])
def test_host_to_device_copies_are_non_blocking_only_to_cuda(device, non_blocking):
    tensor = mock.Mock(spec=torch.Tensor)
    assert to_device(tensor, device) is tensor.to.return_value
    tensor.to.assert_called_once_with(device, non_blocking=non_blocking)


def test_to_device_moves_a_real_tensor():
    moved = to_device(torch.arange(6, dtype=torch.uint8).view(2, 3), torch.device("meta"))
    assert moved.device.type == "meta" and moved.dtype == torch.uint8 and moved.shape == (2, 3)
