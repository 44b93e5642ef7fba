"""What the worker API reports about the hardware it runs on: peak memory and peak FLOP/s.

Both feed the daemon's metrics (docs/metrics.md): a rank's peak memory rides in its heartbeat
(``elasticd_worker_peak_memory_bytes``), and the device's peak FLOP/s turns the model FLOPs a
loop reports into model FLOPs utilisation (``elasticd_train_mfu_ratio``).

Caveats: the peak FLOP/s table holds dense bf16 tensor-core figures of the cards elasticd is
benchmarked on (the same figures as ``bench/gpu.py``); any other device has no known peak, so
no MFU, unless the loop sets :attr:`elastic.worker.Run.peak_flops_per_device` itself. On CPU
the peak memory is the process's peak resident set (``ru_maxrss``), which counts everything the
process touched, not only tensors.
"""

from __future__ import annotations

import resource
import sys

import torch

# Dense bf16 peak FLOP/s per device, by a substring of torch.cuda.get_device_name().
# SXM figures (the PCIe and NVL parts are slower: set the peak by hand there).
PEAK_BF16_FLOPS: dict[str, float] = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
}


def peak_flops(device: torch.device) -> float | None:
    """The device's dense bf16 peak in FLOP/s, or None when it is not in the table (or CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak memory so far: the CUDA allocator's high-water mark on a GPU (a
    host-side counter, no device sync), the peak resident set size otherwise."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    max_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return int(max_rss if sys.platform == "darwin" else max_rss * 1024)
