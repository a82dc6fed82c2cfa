"""What this machine is: the CPU's name and whether it computes bf16 fast.

Low-level helpers shared by teacher training, distillation, their model cards and
the benchmark report (they import nothing of qdlib):

    >>> isinstance(cpu_name(), str), isinstance(cpu_supports_bf16(), bool)
    (True, True)
"""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or ``platform.processor()``; "unknown CPU" when neither says)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def cpu_supports_bf16() -> bool:
    """True where bf16 autocast is fast on this CPU (AVX512-BF16 / AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(choice: str, device=None) -> bool:
    """Whether a trainer's ``mixed_precision`` choice means bf16 autocast on ``device`` (None: cuda when there is
    one, else the CPU).

    >>> use_bf16("bf16"), use_bf16("no"), use_bf16("auto", "cpu") == cpu_supports_bf16()
    (True, False, True)
    """
    if choice != "auto":
        return choice == "bf16"
    import torch

    kind = str(device).split(":")[0] if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        return torch.cuda.is_bf16_supported()
    return cpu_supports_bf16()
