"""LoRA adapters through peft: which modules get one, and the reference policy with them switched off.

Why LoRA: post-training a billion-parameter denoiser with GRPO mostly needs a small change of its
behaviour; low-rank adapters (Hu et al. 2021) on the attention projections train about 0.1-1 % of
the parameters, so the optimiser state and the checkpoints stay small, and the frozen base weights
may sit in half precision.

Why the reference is the adapter switched off: the KL term compares the policy with the model it
started from. With LoRA that model is the base weights, which the policy still holds; running the
same module with every adapter disabled gives the reference exactly (a LoRA layer's output is
``base(x) + B A x * alpha / r``, and disabled it is ``base(x)``), without a second copy of the model.

Vocabulary is peft's: ``r`` (rank), ``lora_alpha``, ``target_modules``, ``lora_dropout``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn


@dataclass(frozen=True)
class LoRAConfig:
    """Low-rank adapters on the denoiser (``peft.LoraConfig``'s fields of the same names)."""

    use_lora: bool = False
    """Train LoRA adapters on ``target_modules`` instead of every weight of the denoiser."""
    r: int = 8
    """Rank of each adapter."""
    lora_alpha: float = 8.0
    """Scale: the adapter's update is multiplied by lora_alpha / r."""
    target_modules: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
    """Module names (suffixes) that get an adapter: diffusers' attention projections by default, present in
    both UNet2DConditionModel and SD3Transformer2DModel (SD3 also has add_q_proj, add_k_proj, add_v_proj,
    to_add_out for the text stream)."""
    init_lora_weights: str = "gaussian"
    """peft's initialisation: 'gaussian' (A ~ N(0, 1/r), B = 0, diffusers' training scripts) or 'default'
    (Kaiming-uniform A); B = 0 either way, so the adapted model starts equal to the base model."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r={self.r} must be >= 1; fix --lora.r")
        if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise ValueError(f"lora.lora_alpha={self.lora_alpha} must be > 0; fix --lora.lora-alpha")
        if not self.target_modules:
            raise ValueError("lora.target_modules is empty; name the modules to adapt, e.g. --lora.target-modules "
                             "to_q to_k to_v to_out.0")
        if self.init_lora_weights not in ("gaussian", "default"):
            raise ValueError(f"lora.init_lora_weights={self.init_lora_weights!r} is not 'gaussian' or 'default'")
        defaults = {f.name: f.default for f in fields(self) if f.name != "use_lora"}
        if not self.use_lora and any(getattr(self, name) != value for name, value in defaults.items()):
            raise ValueError("--lora.* settings were given without --lora.use-lora; add it or drop them")


def add_lora(model: nn.Module, cfg: LoRAConfig, *, adapter_name: str = "default") -> nn.Module:
    """Freeze ``model`` and add trainable LoRA adapters (float32) on ``cfg.target_modules``, in place.

    Uses diffusers' ``add_adapter`` when the model has it (the models of a diffusers pipeline), else
    peft's ``inject_adapter_in_model``. Raises naming the fix when no module matches. The adapters'
    random A matrices are drawn from the global RNG (seed it for reproducible runs).
    """
    from peft import LoraConfig, inject_adapter_in_model

    if not cfg.use_lora:
        raise ValueError("add_lora called with lora.use_lora=False; pass --lora.use-lora")
    model.requires_grad_(False)
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                        init_lora_weights=True if cfg.init_lora_weights == "default" else "gaussian",
                        lora_dropout=0.0)
    try:
        if hasattr(model, "add_adapter"):
            model.add_adapter(config, adapter_name=adapter_name)
        else:
            inject_adapter_in_model(config, model, adapter_name=adapter_name)
    except ValueError as error:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"no module of {type(model).__name__} matches lora.target_modules={cfg.target_modules} "
                         f"({error}); linear layers it has end in: {names[:20]}") from None
    for param in lora_parameters(model):
        param.data = param.data.float()  # trainable adapters in float32 even on a half-precision base
        param.requires_grad_(True)
    return model


def lora_layers(model: nn.Module) -> list[nn.Module]:
    """Every peft tuner layer (a module holding adapters) of ``model``."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


def has_lora(model: nn.Module) -> bool:
    """True when ``model`` (or the module a DDP wrapper holds) carries peft adapters."""
    return bool(lora_layers(extract_model_from_parallel(model, keep_torch_compile=False)))


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (names containing 'lora_')."""
    return [p for name, p in model.named_parameters() if "lora_" in name]


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """Run ``model`` as its base weights: every adapter off inside the block, restored after.

    peft's ``enable_adapters(False)`` also sets the adapters' ``requires_grad`` to False, so the
    flags are saved and put back exactly (the optimiser and DDP expect them unchanged).
    """
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no LoRA adapter to disable; the reference of a model "
                         "without adapters is a frozen copy (diffgrpo.train_step.frozen_copy)")
    flags = {id(p): p.requires_grad for m in layers for p in m.parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for m in layers:
            for p in m.parameters():
                p.requires_grad_(flags[id(p)])


class AdapterDisabledReference(nn.Module):
    """The KL reference pi_ref as a callable: the policy's module with its adapters switched off.

    Holds the policy without registering it (no second copy of its weights in ``state_dict`` or
    ``parameters()``); calling it runs ``policy(*args, **kwargs)`` inside :func:`adapters_disabled`.
    A task's ``predict`` may therefore receive it in place of a model: only call the model there.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        if not has_lora(policy):
            raise ValueError(f"{type(policy).__name__} has no LoRA adapter; use a frozen copy as the reference")
        object.__setattr__(self, "_policy", extract_model_from_parallel(policy, keep_torch_compile=False))

    def forward(self, *args, **kwargs):
        with torch.no_grad(), adapters_disabled(self._policy):
            return self._policy(*args, **kwargs)
