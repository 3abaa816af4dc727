"""Mixed precision that pays: which devices gain from bf16, and where attention stays fp32.

Why: bf16 autocast only speeds a run up where bf16 matrix products are much faster than fp32 ones.
On x86 CPUs that takes AMX (the ``amx_bf16`` matrix units, Sapphire Rapids and later): AMX-BF16 is
rated at up to 16x the fp32 FMA throughput per core. AVX512-BF16 alone (``avx512_bf16`` without AMX)
computes bf16 natively but, at the ego-motion denoiser's sizes, oneDNN's bf16 matrix products ran
at 0.67x of fp32 on such a CPU, and bf16 autocast ran rollout + update at 0.62x of fp32's speed
(0.77x with fp32 attention; medians over 5 interleaved rounds at one thread,
``recipes/benchmarks/bench_precision.py``, ``docs/data/bench_precision.json``). So
``resolve_mixed_precision("auto", device)`` picks bf16 only where it pays: CUDA GPUs with native
bf16, CPUs with AMX-BF16.

Attention is the exception inside the autocast region: PyTorch's CPU kernel for
``scaled_dot_product_attention`` in bf16 runs its backward about 3x slower than in fp32 (half of a
bf16 forward + backward of the ego-motion denoiser on an AMX CPU), while the surrounding matrix
products gain several-fold. :func:`scaled_dot_product_attention` therefore casts q, k, v up to fp32
on CPU, attends in fp32 with autocast off, and casts the output back to the autocast dtype; on CUDA
the fused bf16 kernels are fast and it calls them unchanged (:func:`attention_in_float32`).

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


FAST_BF16_CPU_FLAGS = frozenset({"amx_bf16"})
"""``/proc/cpuinfo`` flags of bf16 matrix units fast enough for bf16 autocast to pay (x86 AMX-BF16)."""


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor listed in ``cpuinfo`` (the text of ``/proc/cpuinfo``):
    the ``flags`` line on x86, the ``Features`` line on Arm; empty when neither is present."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def _cpuinfo_text(cpuinfo: str | None) -> str:
    """``cpuinfo`` itself, or the system's ``/proc/cpuinfo`` when None ("" where there is none)."""
    if cpuinfo is not None:
        return cpuinfo
    path = Path("/proc/cpuinfo")
    return path.read_text() if path.exists() else ""


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether the CPU computes bf16 natively (one of :data:`NATIVE_BF16_CPU_FLAGS`).

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read from the system when None). Where the system
    has no ``/proc/cpuinfo`` (macOS, Windows) the answer is False: bf16 is then only used when asked
    for explicitly.
    """
    return bool(cpu_flags(_cpuinfo_text(cpuinfo)) & NATIVE_BF16_CPU_FLAGS)


def cpu_bf16_pays(cpuinfo: str | None = None) -> bool:
    """Whether bf16 autocast is expected to speed up training on this CPU: x86 with AMX-BF16
    (``amx_bf16``, :data:`FAST_BF16_CPU_FLAGS`).

    AVX512-BF16 without AMX is native but measured slower than fp32 (module docstring); Arm
    FEAT_BF16 is native but unmeasured here, so it is not assumed to pay either.
    """
    return bool(cpu_flags(_cpuinfo_text(cpuinfo)) & FAST_BF16_CPU_FLAGS)


def has_native_bf16(device: torch.device | str, *, cpuinfo: str | None = None) -> bool:
    """Whether ``device`` computes bf16 natively: on CUDA, ``torch.cuda.is_bf16_supported`` without
    emulation (Ampere and later); on CPU, :func:`cpu_has_native_bf16`; False on other devices."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return cpu_has_native_bf16(cpuinfo)
    return False


def resolve_mixed_precision(requested: str, device: torch.device | str | None = None, *,
                            cpuinfo: str | None = None) -> MixedPrecision:
    """The accelerate ``mixed_precision`` to run with on ``device`` for a requested value.

    ``device``: where the run computes; None means the one accelerate picks by default (CUDA when
    available, else the CPU).

    "auto" becomes "bf16" where bf16 pays: a CUDA device with native bf16 (:func:`has_native_bf16`)
    or a CPU with AMX-BF16 (:func:`cpu_bf16_pays`); "no" elsewhere. "no", "fp16" and "bf16" are
    kept. An explicit "bf16" on a CPU without AMX is kept but logged as a warning: emulated bf16
    (no AVX512-BF16 either) and AVX512-BF16 alone both ran slower than fp32.

    Raises:
        ValueError: ``requested`` is not one of :data:`REQUESTABLE`.
    """
    if requested not in REQUESTABLE:
        raise ValueError(f"mixed_precision={requested!r} is not one of {REQUESTABLE}; pass --mixed-precision auto "
                         "to use bf16 where it pays (CUDA with native bf16, CPUs with AMX-BF16).")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_cpu = torch.device(device).type == "cpu"
    pays = cpu_bf16_pays(cpuinfo) if on_cpu else has_native_bf16(device)
    if requested == "auto":
        return "bf16" if pays else "no"
    if requested == "bf16" and on_cpu and not pays:
        how = ("AVX512-BF16 without AMX: bf16 matrix products ran at 0.67x of fp32"
               if cpu_has_native_bf16(cpuinfo) else "no native bf16: bf16 is emulated")
        logger.warning("mixed_precision='bf16' on a CPU with %s, so bf16 runs slower than fp32 here; pass "
                       "--mixed-precision auto (or no) to train in fp32.", how)
    return requested  # type: ignore[return-value]  # checked against REQUESTABLE above


def attention_in_float32(device: torch.device | str) -> bool:
    """Whether attention inside a bf16/fp16 autocast region runs in fp32 on ``device``.

    CPU: yes. PyTorch's CPU attention backward in bf16 is about 3x slower than in fp32. On a CPU whose
    bf16 matrix products ran about 4x faster than fp32 (390 against 95 GFLOP/s on one core: matrix
    units), bf16 autocast with fp32 attention ran the main job's rollout + update 1.89x faster than
    fp32, where bf16 attention gained only 1.13-1.52x per iteration. On an AVX512-BF16 CPU without
    AMX, fp32 attention recovers part of bf16's loss: rollout + update at 0.77x of fp32 against 0.62x
    (``bench_precision.py``).
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
    The choice depends on the device alone, never on the grad mode: the rollout (no_grad) and the
    update (with grad) must compute the same function, or the on-policy ratio departs from 1.
    """
    device_type = q.device.type
    if not (torch.is_autocast_enabled(device_type) and attention_in_float32(q.device)):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    with torch.autocast(device_type, enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask)
    return out.to(torch.get_autocast_dtype(device_type))
