"""Peak FLOP/s of one device, the denominator of model FLOPs utilisation (MFU)."""

from __future__ import annotations

import logging
import time

import torch

log = logging.getLogger(__name__)

# Dense (no 2:4 sparsity) peak FLOP/s per GPU from NVIDIA's datasheets, as
# (bf16/fp16 tensor core, tf32 tensor core, plain fp32). Datasheets quote sparse numbers for
# tensor cores; dense is half of those. First matching substring of the device name wins, so
# longer names come before their prefixes ("H100 PCIe" before "H100", "A100" before "A10").
_GPU_PEAKS: tuple[tuple[str, tuple[float, float, float]], ...] = (
    ("H100 PCIe", (756e12, 378e12, 51e12)),  # H100 datasheet, PCIe column
    ("H100 NVL", (835e12, 418e12, 60e12)),  # H100 datasheet, NVL column
    ("H100", (989e12, 494e12, 67e12)),  # H100 datasheet, SXM column
    ("H200", (989e12, 494e12, 67e12)),  # H200 datasheet, SXM column (GH200 the same)
    ("B200", (2250e12, 1100e12, 80e12)),  # HGX B200 datasheet; unsure: varies by SKU and power
    ("A100", (312e12, 156e12, 19.5e12)),  # A100 datasheet (SXM and PCIe alike)
    ("L40S", (362e12, 183e12, 91.6e12)),  # L40S datasheet
    ("L40", (181e12, 90.5e12, 90.5e12)),  # L40 datasheet
    ("A10G", (125e12, 62.5e12, 31.2e12)),  # AWS A10G; unsure: assumed equal to the A10
    ("A10", (125e12, 62.5e12, 31.2e12)),  # A10 datasheet
    ("L4", (121e12, 60e12, 30.3e12)),  # L4 datasheet
    ("V100", (125e12, 15.7e12, 15.7e12)),  # V100 SXM2 datasheet: fp16 only, no bf16 or tf32
    # Ada whitepaper: fp16 with fp32 accumulate (GeForce runs it at half the fp16-accumulate
    # rate). Unsure: clocks differ between boards.
    ("RTX 4090", (165e12, 82.6e12, 82.6e12)),
)

_probe_cache: dict[tuple[str, torch.dtype], float] = {}


def _precision_column(dtype: torch.dtype) -> int:
    if dtype != torch.float32:
        return 0  # bf16, fp16 and narrower formats are all quoted against the 16-bit peak
    # fp32 matmuls use tf32 tensor cores only when allowed (torch's default is "highest").
    return 2 if torch.get_float32_matmul_precision() == "highest" else 1


def _probe(device: torch.device, dtype: torch.dtype) -> float:
    """Best-of-5 FLOP/s of one square matmul; what this device reaches, not its datasheet."""
    key = (device.type, dtype)
    if key in _probe_cache:
        return _probe_cache[key]
    # 2048 keeps the CPU probe well under a second; a GPU needs a larger matmul so that
    # kernel launch overhead does not dominate.
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    best = float("inf")
    budget = time.perf_counter() + 1.0  # slow dtypes (bf16 on a CPU without bf16 units)
    for i in range(7):
        sync()
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        if i >= 2:  # the first two warm up caches, threads and kernel selection
            best = min(best, time.perf_counter() - start)
            if time.perf_counter() > budget:
                break
    _probe_cache[key] = 2 * n**3 / best
    return _probe_cache[key]


def peak_flops(
    device: torch.device, dtype: torch.dtype, override: float | None = None
) -> tuple[float, str]:
    """Peak FLOP/s of one ``device`` computing in ``dtype``, and how it was obtained.

    ``override`` (``metrics.peak_flops`` in the config) wins; a GPU found in the datasheet table
    gets its dense peak; anything else gets a measured matmul probe (cached per device type and
    dtype for the life of the process). Raises ``ValueError`` for a non-positive override.
    """
    if override is not None:
        if override <= 0:
            raise ValueError(f"peak FLOP/s override must be positive, got {override}")
        return float(override), "config override (metrics.peak_flops)"
    dtype_name = str(dtype).removeprefix("torch.")
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        column = _precision_column(dtype)
        for pattern, peaks in _GPU_PEAKS:
            if pattern in name:
                kind = ("16-bit tensor core", "tf32 tensor core", "fp32")[column]
                return peaks[column], f"datasheet: {name} ({pattern}, {kind}, dense)"
        log.warning(
            "GPU %r is not in the peak FLOP/s table; measuring a matmul instead, so MFU is "
            "relative to what a plain matmul reaches; set metrics.peak_flops to use the "
            "datasheet value",
            name,
        )
    flops = _probe(device, dtype)
    return flops, f"measured: best 2n^3/time of torch.mm in {dtype_name} on {device.type}"


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over ``peak`` (a fraction, not percent).

    ``flops_per_token`` counts forward and backward (about 6N + attention, PaLM appendix B).
    Raises ``ValueError`` if ``peak`` is not positive.
    """
    if peak <= 0:
        raise ValueError(f"peak FLOP/s must be positive, got {peak}")
    return tokens_per_second_per_device * flops_per_token / peak
