"""The KL guard of the forward-process objectives: the prediction gap to a frozen reference.

Why: an objective that only regresses towards rewarded samples drifts until the reward is hacked
(the unguarded x0 regression peaks and then degrades held-out metrics). The ratio objective's
guard is the exact Gaussian step KL (``diffgrpo.loss.gaussian_step_kl``); the forward-process
objectives (``diffgrpo.nft``, ``diffgrpo.awm``) have no step Gaussians, so they are guarded by

    gap(x_t, t) = ||f_theta(x_t, t) - f_ref(x_t, t)||^2 / D          (mean over the D dimensions)

at the same forward-noised x_t they train on. It is a KL in disguise: two reverse SDEs that differ
only in their drift have path-measure KL = 1/2 int E ||drift difference||^2 / g(t)^2 dt (Girsanov),
and the drift difference is c(t) (f_theta - f_ref) in any parametrisation, so the gap is that KL up to
a weighting over t (the same relation that makes the denoising loss a weighted ELBO; Song et al.
2021, "Maximum likelihood training of score-based diffusion models", Thm. 1). DiffusionNFT (Zheng
et al. 2025) and advantage-weighted matching (Xue et al. 2025) regularise with this gap.

The reference is the adapter-disabled policy under LoRA (``diffgrpo.lora.AdapterDisabledReference``:
no second copy of the weights, one extra forward pass without gradient) or a frozen copy otherwise
(``diffgrpo.train_step.frozen_copy``: the weights' memory once more, the same extra forward pass).
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from torch import Tensor


def prediction_gap(prediction: Float[Tensor, "N ..."], other: Float[Tensor, "N ..."]) -> Float[Tensor, " N"]:
    """||prediction - other||^2 averaged over the non-batch dimensions, per element, in float32 (or float64).

    ``other`` is detached (the frozen reference, or the old policy for DiffusionNFT's deviation);
    the gradient flows through ``prediction`` only. Both must be in the same parametrisation and at
    the same (x_t, t). Identical inputs give exactly 0. Raises ValueError on a shape mismatch.
    """
    if prediction.shape != other.shape or prediction.ndim < 1:
        raise ValueError(f"prediction {tuple(prediction.shape)} and other {tuple(other.shape)} must share one "
                         "(N, ...) shape: evaluate both models at the same x_t and t")
    dtype = torch.float64 if torch.float64 in (prediction.dtype, other.dtype) else torch.float32
    diff = prediction.to(dtype) - other.detach().to(dtype)
    return diff.square().reshape(prediction.shape[0], -1).mean(dim=1)
