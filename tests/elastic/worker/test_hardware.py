"""Peak memory and peak FLOP/s of the device a worker runs on (elastic/worker/hardware.py)."""

from __future__ import annotations

import resource

import pytest
import torch

from elastic.worker import hardware


def test_cpu_has_no_known_peak_flops() -> None:
    assert hardware.peak_flops(torch.device("cpu")) is None


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", None),
    ],
)
def test_a_gpu_peak_comes_from_its_name_in_the_table(
    monkeypatch: pytest.MonkeyPatch, name: str, peak: float | None
) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert hardware.peak_flops(torch.device("cuda", 0)) == peak


def test_cpu_peak_memory_is_the_process_peak_rss_in_bytes() -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = hardware.peak_memory_bytes(torch.device("cpu"))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert before <= measured <= after and measured > 1 << 20


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_peak_memory_is_the_allocator_high_water_mark() -> None:
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats(device)
    block = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    assert hardware.peak_memory_bytes(device) >= 64 << 20
    del block
