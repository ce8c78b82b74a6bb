"""Memory-bandwidth figures of the involution op: bytes it must move and the device's peak.

The op is memory bound (about 2*K*K flops per output element against a few bytes), so the
useful measure of a kernel is the fraction of the DRAM peak it reaches:
``bandwidth_fraction(min_bytes_moved(...), seconds, device)``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def peak_memory_bandwidth(device: torch.device | str) -> float | None:
    """Theoretical peak DRAM bandwidth of a CUDA ``device`` in bytes/s; ``None`` elsewhere.

    From the memory clock and bus width CUDA reports: ``2 * clock * bus_width / 8`` (double
    data rate), e.g. 3.35e12 for an H100 SXM (HBM3, 2619 MHz, 5120 bit).
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(device)
    clock_khz = getattr(props, "memory_clock_rate", 0)
    bus_bits = getattr(props, "memory_bus_width", 0)
    if not clock_khz or not bus_bits:
        return None
    return 2.0 * clock_khz * 1e3 * bus_bits / 8


def min_bytes_moved(input_shape: Sequence[int], weight_shape: Sequence[int], itemsize: int) -> int:
    """Compulsory DRAM traffic of one pass: every operand read once, the result written once.

    The same for the forward (reads input and weight, writes output), the input gradient
    (reads grad_output and weight, writes grad_input) and the weight gradient (reads grad_output
    and input, writes grad_weight): each touches one input-, one weight- and one output-sized
    tensor.

    Args:
        input_shape: (B, C, H, W).
        weight_shape: (B, G, Kh, Kw, H_out, W_out).
        itemsize: bytes per element (``tensor.element_size()``).
    """
    if len(input_shape) != 4 or len(weight_shape) != 6:
        raise ValueError(
            f"expected input (B, C, H, W) and weight (B, G, Kh, Kw, H_out, W_out), got "
            f"{tuple(input_shape)} and {tuple(weight_shape)}"
        )
    batch, channels = input_shape[:2]
    output_elements = batch * channels * weight_shape[-2] * weight_shape[-1]
    return (math.prod(input_shape) + math.prod(weight_shape) + output_elements) * itemsize


def bandwidth_fraction(
    bytes_moved: int, seconds: float, device: torch.device | str
) -> float | None:
    """Achieved bandwidth ``bytes_moved / seconds`` as a fraction of the device's peak.

    ``None`` when the peak is unknown (CPU, or a GPU that does not report it).
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    peak = peak_memory_bandwidth(device)
    return None if peak is None else bytes_moved / seconds / peak
