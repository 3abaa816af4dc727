"""Exploration subspaces: where a stochastic reverse step puts its noise, and where its density lives.

Why: the score-function (GRPO) gradient of a Gaussian step is sum_i A_i (x'_i - mu_i) / std^2 . dmu/dtheta.
Every noise direction adds variance to that sum, but only the directions the rewards respond to add
signal. An ego-motion sample holds 128 frames x 226 numbers; its rewards read the body rotations
(not betas or contacts) and respond to smooth, low-frequency motion, not to frame-to-frame noise. Putting
the step's noise in the subspace spanned by the lowest ``r`` temporal frequencies of the chosen features
cuts the dimension of the action (e.g. 28,928 -> 8 x 189 = 1,512) while keeping the directions that
change a reward; the estimate's noise falls with the dimension (issue 9: "no exploration noise on
dimensions the rewards ignore").

The step stays exact. Let B be an orthonormal basis of the subspace (columns). With mu_eta the
stochastic step's mean and mu_0 the same rule's deterministic (eta = 0) mean,

    x' = mu_0 + B B^T (mu_eta - mu_0) + std B z,    z ~ N(0, I_r),

so inside the subspace the step is the stochastic step (mean B^T mu_eta, std) and outside it the
deterministic one. Because the forward process is isotropic, DDIM's construction holds coordinate by
coordinate in any orthonormal basis, so each part keeps the marginals of its own eta. The step has a
density only on the subspace: log pi(x' | x) = log N(B^T x'; B^T mu_eta, std^2 I_r), which is what
``diffgrpo.sde.reverse_step`` returns when given a subspace. As with ``SamplerConfig.sde_window``,
the deterministic part moves with theta without a density, so the policy gradient flows through the
subspace coordinates only.

The basis used here is separable: a DCT-II basis over the sample's axis 1 (time, for trajectories)
times a selection of features on the last axis. Either factor may be the identity.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import scipy.fft
import torch
from jaxtyping import Float
from torch import Tensor


@functools.lru_cache(maxsize=16)
def dct_basis(length: int, num_components: int) -> Float[Tensor, "length num_components"]:
    """The lowest ``num_components`` orthonormal DCT-II basis vectors of length ``length`` as columns.

    Column k is sqrt(2/T) cos(pi (t + 1/2) k / T) (k = 0: sqrt(1/T)), from ``scipy.fft.dct`` with
    norm="ortho" (Ahmed, Natarajan & Rao 1974): frequency k / (2T) cycles per frame. Cached: treat
    the returned tensor as read-only.
    """
    if not 1 <= num_components <= length:
        raise ValueError(f"num_components={num_components} must be in [1, {length}] (the axis length)")
    matrix = scipy.fft.dct(np.eye(length), norm="ortho", axis=0)  # (T, T): row k = frequency k
    return torch.from_numpy(np.ascontiguousarray(matrix[:num_components].T))  # float64: cast where used


@dataclass(frozen=True)
class ExplorationSubspace:
    """A separable orthonormal subspace of samples shaped (T, ..., F): DCT frequencies x feature range.

    ``time_basis`` (T, r) acts on the sample's axis 1 (after the batch axis); ``features`` [start, stop)
    selects entries of the last axis. ``None`` leaves that factor whole.
    """

    sample_shape: tuple[int, ...]
    """Shape of one sample without the batch axis, e.g. (128, 226)."""
    time_basis: Tensor | None = None
    """(T, r) orthonormal columns over axis 1, or None for every frame."""
    features: tuple[int, int] | None = None
    """[start, stop) on the last axis, or None for every feature."""

    def __post_init__(self) -> None:
        if self.time_basis is not None:
            if len(self.sample_shape) < 1 or self.time_basis.shape[0] != self.sample_shape[0]:
                raise ValueError(f"time_basis has {self.time_basis.shape[0]} rows but the sample's axis 1 has "
                                 f"length {self.sample_shape[:1]}; build it with dct_basis(T, r)")
        if self.features is not None:
            start, stop = self.features
            size = self.sample_shape[-1] if self.sample_shape else 0
            if not 0 <= start < stop <= size:
                raise ValueError(f"features={self.features} must satisfy 0 <= start < stop <= {size} (the sample's "
                                 "last axis)")
            if self.time_basis is not None and len(self.sample_shape) < 2:
                raise ValueError("a time basis and a feature range need samples with >= 2 axes (T, ..., F)")

    @classmethod
    def build(cls, sample_shape: tuple[int, ...], num_frequencies: int | None,
              features: tuple[int, int] | None) -> ExplorationSubspace | None:
        """The subspace for ``SamplerConfig.noise_frequencies`` / ``noise_features``; None when both are None."""
        if num_frequencies is None and features is None:
            return None
        basis = None if num_frequencies is None else dct_basis(sample_shape[0], num_frequencies)
        return cls(tuple(sample_shape), basis, features)

    @property
    def coordinate_shape(self) -> tuple[int, ...]:
        """The sample shape in subspace coordinates: axis 1 cut to the basis' r, the last to the features."""
        shape = list(self.sample_shape)
        if self.time_basis is not None:
            shape[0] = self.time_basis.shape[1]
        if self.features is not None:
            shape[-1] = self.features[1] - self.features[0]
        return tuple(shape)

    @property
    def num_coordinates(self) -> int:
        """r: the dimension of the subspace (the step density's dimension)."""
        return int(np.prod(self.coordinate_shape))

    def coordinates(self, v: Float[Tensor, "B ..."]) -> Float[Tensor, "B r"]:
        """B^T v: the subspace coordinates of each sample (B, *sample_shape) -> (B, r)."""
        if tuple(v.shape[1:]) != self.sample_shape:
            raise ValueError(f"expected samples shaped (B, {self.sample_shape}), got {tuple(v.shape)}")
        if self.features is not None:
            v = v[..., self.features[0]:self.features[1]]
        if self.time_basis is not None:
            v = torch.tensordot(v, self.time_basis.to(v), dims=([1], [0])).movedim(-1, 1)  # (B, r, ..., F)
        return v.reshape(v.shape[0], -1)

    def embed(self, c: Float[Tensor, "B r"]) -> Float[Tensor, "B ..."]:
        """B c: coordinates (B, r) back to samples (B, *sample_shape), zero outside the subspace."""
        v = c.reshape(c.shape[0], *self.coordinate_shape)
        if self.time_basis is not None:
            v = torch.tensordot(v, self.time_basis.to(v).T, dims=([1], [0])).movedim(-1, 1)  # (B, T, ..., F')
        if self.features is not None:
            full = v.new_zeros(v.shape[0], *self.sample_shape)
            full[..., self.features[0]:self.features[1]] = v
            v = full
        return v

    def project(self, v: Float[Tensor, "B ..."]) -> Float[Tensor, "B ..."]:
        """B B^T v: the orthogonal projection of each sample onto the subspace."""
        return self.embed(self.coordinates(v))
