"""Mixed precision that pays: which devices compute bf16 natively, and where attention stays fp32.

Why: bf16 autocast only speeds a run up where the hardware has bf16 arithmetic. A CPU with
AVX512-BF16 or AMX multiplies bf16 matrices several times faster than fp32 ones (about 390 against
95 GFLOP/s on one core of the reference machine, ``recipes/benchmarks/bench_precision.py``); a CPU
without them emulates bf16 through fp32 conversions and runs slower than plain fp32. So
``resolve_mixed_precision("auto", device)`` picks bf16 only where it is native.

Attention is the exception inside the autocast region: PyTorch's CPU kernel for
``scaled_dot_product_attention`` in bf16 runs its backward about 3x slower than in fp32 (half of a
bf16 forward + backward of the ego-motion denoiser), while the surrounding matrix products gain
4x. :func:`scaled_dot_product_attention` therefore casts q, k, v up to fp32 on CPU, attends in
fp32 with autocast off, and casts the output back to the autocast dtype; on CUDA the fused bf16
kernels are fast and it calls them unchanged (:func:`attention_in_float32`). The numbers behind
this policy come from ``recipes/benchmarks/bench_precision.py`` (see ``docs/benchmarks.md``).

Densities stay exact in every mode: rollout and update call the same network under the same
autocast, so the first update after sampling reproduces the stored log-probabilities bit for bit
(``tests/test_precision.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor
from torch.nn import functional as F

logger = logging.getLogger(__name__)

MixedPrecision = Literal["no", "fp16", "bf16"]
REQUESTABLE = ("auto", "no", "fp16", "bf16")
"""Values ``resolve_mixed_precision`` accepts; every one but "auto" passes through to accelerate."""

NATIVE_BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
"""``/proc/cpuinfo`` flags of bf16 arithmetic: x86 AVX512-BF16 and AMX-BF16 (``flags`` line), Arm
FEAT_BF16 (``Features`` line)."""


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in ``cpuinfo`` (the text of ``/proc/cpuinfo``):
    the ``flags`` line on x86, the ``Features`` line on Arm; empty when neither is present."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (one of :data:`NATIVE_BF16_CPU_FLAGS`).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read from the system when None). Where the system
    has no ``/proc/cpuinfo`` (macOS, Windows) the answer is False: bf16 is then only used when asked
    for explicitly.
    """
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        if not path.exists():
            return False
        cpuinfo = path.read_text()
    return bool(cpu_flags(cpuinfo) & NATIVE_BF16_CPU_FLAGS)


def has_native_bf16(device: torch.device | str, *, cpuinfo: str | None = None) -> bool:
    """Whether ``device`` computes bf16 natively: on CUDA, ``torch.cuda.is_bf16_supported`` without
    emulation (Ampere and later); on CPU, :func:`cpu_has_native_bf16`; False on other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16(cpuinfo)
    return False


def resolve_mixed_precision(requested: str, device: torch.device | str, *, cpuinfo: str | None = None
                            ) -> MixedPrecision:
    """The accelerate ``mixed_precision`` to run with on ``device`` for a requested value.

    "auto" becomes "bf16" where the device computes bf16 natively (:func:`has_native_bf16`) and
    "no" elsewhere; "no", "fp16" and "bf16" are kept. An explicit "bf16" on a CPU without native
    bf16 is kept but logged as a warning, because emulated bf16 runs slower than fp32.

    Raises:
        ValueError: ``requested`` is not one of :data:`REQUESTABLE`.
    """
    if requested not in REQUESTABLE:
        raise ValueError(f"mixed_precision={requested!r} is not one of {REQUESTABLE}; pass --mixed-precision auto "
                         "to use bf16 where the device computes it natively.")
    native = has_native_bf16(device, cpuinfo=cpuinfo)
    if requested == "auto":
        return "bf16" if native else "no"
    if requested == "bf16" and torch.device(device).type == "cpu" and not native:
        logger.warning("mixed_precision='bf16' on a CPU without AVX512-BF16, AMX or Arm BF16: bf16 is emulated and "
                       "runs slower than fp32; pass --mixed-precision auto (or no) to train in fp32 here.")
    return requested  # type: ignore[return-value]  # checked against REQUESTABLE above


def attention_in_float32(device: torch.device | str) -> bool:
    """Whether attention inside a bf16/fp16 autocast region runs in fp32 on ``device``.

    CPU: yes. PyTorch's CPU attention backward in bf16 is about 3x slower than in fp32, so on the
    ego-motion main job's sizes bf16 autocast with fp32 attention ran rollout + update about 1.9x
    faster than fp32, against about 1.1-1.5x with bf16 attention (``bench_precision.py``).
    CUDA and others: no, their fused low-precision attention kernels are the fast path.
    """
    return torch.device(device).type == "cpu"


def scaled_dot_product_attention(
    q: Float[Tensor, "*B Lq Dh"],
    k: Float[Tensor, "*B Lk Dh"],
    v: Float[Tensor, "*B Lk Dv"],
    attn_mask: Bool[Tensor, "..."] | None = None,
) -> Float[Tensor, "*B Lq Dv"]:
    """``F.scaled_dot_product_attention`` under the precision policy of :func:`attention_in_float32`.

    Outside autocast, or where the policy keeps the native kernel, this is the plain call. Inside a
    bf16/fp16 autocast region on CPU: q, k, v are cast up to fp32, attended with autocast off, and
    the output is cast back to the autocast dtype, so the next layer sees what plain autocast gives.
    """
    device_type = q.device.type
    if not (torch.is_autocast_enabled(device_type) and attention_in_float32(q.device)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.autocast(device_type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(torch.get_autocast_dtype(device_type))
