"""The per-frame motion vector the diffusion prior generates, and the weights its loss uses.

Why one module: the packed layout (which dimensions hold betas, rotations, contacts, hands) is
read by the network (one input MLP and one output head per modality), by the loss (per-dimension
weights) and by the sampler's decoder (projection onto SO(3)). Defining the slices once here keeps
those three in agreement.

Per frame (docs/ego_motion_prior.md), in this order:

====================  =====  ===========  =========================================
modality              dims   slice        content
====================  =====  ===========  =========================================
``betas``             16     0:16         SMPL-H shape, constant in time, predicted per frame
``body_rotmats``      189    16:205       21 local body-joint rotations, 3x3, row-major
``contacts``          21     205:226      per-joint contact in [0, 1]
``hand_rotmats``      270    226:496      30 local hand-joint rotations (optional)
====================  =====  ===========  =========================================

Timestep conventions. EgoAllo counts timesteps so: t = 0 is the clean sample
(alpha_bar = 1) and t = 1..1000 are noise levels. A diffusers scheduler with 1000 training steps
stores ``alphas_cumprod[i]`` for i = 0..999, which is the noise level of EgoAllo's t = i + 1 (both
come from the same cosine alpha_bar(i / N) with the clean level dropped). :func:`sampling_timesteps`
returns either numbering; :func:`timestep_loss_weights` is indexed like ``alphas_cumprod``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Float, Int
from torch import Tensor
from typing_extensions import assert_never

from tasks.ego_motion.body.geometry import NUM_BETAS, NUM_BODY_JOINTS, NUM_HAND_JOINTS, project_to_so3

BETAS = slice(0, NUM_BETAS)
BODY_ROTMATS = slice(BETAS.stop, BETAS.stop + NUM_BODY_JOINTS * 9)
CONTACTS = slice(BODY_ROTMATS.stop, BODY_ROTMATS.stop + NUM_BODY_JOINTS)
HAND_ROTMATS = slice(CONTACTS.stop, CONTACTS.stop + NUM_HAND_JOINTS * 9)

MOTION_DIM = CONTACTS.stop  # 226
MOTION_DIM_WITH_HANDS = HAND_ROTMATS.stop  # 496

Modality = Literal["betas", "body_rotmats", "contacts", "hand_rotmats"]

# Per-modality loss weights of docs/ego_motion_prior.md (betas additionally decay as 1/(i+1)).
BETAS_LOSS_WEIGHT = 0.1
BODY_ROTMATS_LOSS_WEIGHT = 1.0
CONTACTS_LOSS_WEIGHT = 0.1
HAND_ROTMATS_LOSS_WEIGHT = 0.01


def motion_dim(include_hands: bool) -> int:
    """Packed size D per frame: 226 without hands, 496 with."""
    return MOTION_DIM_WITH_HANDS if include_hands else MOTION_DIM


def modality_slices(include_hands: bool) -> dict[Modality, slice]:
    """The packed slice of each modality present, in packing order.

    Why a function: the network builds one input MLP and one output head per entry, so adding a
    modality here is the only change the layout needs.
    """
    slices: dict[Modality, slice] = {"betas": BETAS, "body_rotmats": BODY_ROTMATS, "contacts": CONTACTS}
    if include_hands:
        slices["hand_rotmats"] = HAND_ROTMATS
    return slices


def feature_range(modalities: tuple[Modality, ...], include_hands: bool) -> tuple[int, int]:
    """[start, stop) of the packed features holding ``modalities``, which must be adjacent in the layout.

    Why: an exploration subspace (``SamplerConfig.noise_features``) is one range of the last axis; the
    recipes name it by modality (e.g. ("body_rotmats",) -> (16, 205)). Raises ValueError naming the
    known modalities, or the gap, when the request is not one contiguous range.
    """
    slices = modality_slices(include_hands)
    unknown = [m for m in modalities if m not in slices]
    if not modalities or unknown:
        raise ValueError(f"noise modalities {list(modalities)}: give one or more of {list(slices)}"
                         + (f" ({unknown} unknown{'' if include_hands else ' without hands'})" if unknown else ""))
    chosen = sorted((slices[m] for m in set(modalities)), key=lambda s: s.start)
    for before, after in zip(chosen, chosen[1:], strict=False):
        if before.stop != after.start:
            raise ValueError(f"noise modalities {list(modalities)} are not adjacent in the packed layout "
                             f"{list(slices)}; choose neighbouring modalities (one feature range)")
    return chosen[0].start, chosen[-1].stop


def _check_packed_dim(x: Tensor, include_hands: bool) -> None:
    expected = motion_dim(include_hands)
    if x.ndim < 2 or x.shape[-1] != expected:
        raise ValueError(
            f"packed motion has shape {tuple(x.shape)}, expected (..., T, {expected}) for "
            f"include_hands={include_hands}; pass include_hands={not include_hands} if the "
            f"last dimension is {motion_dim(not include_hands)}."
        )


@dataclass(frozen=True)
class MotionSample:
    """One motion window in the representation the prior generates; any leading batch axes.

    Why a dataclass and not a bare tensor: the fields carry the joint structure (3x3 rotations,
    per-joint contacts) that forward kinematics, rewards and metrics need, while :meth:`pack` and
    :meth:`unpack` convert to and from the flat ``(..., T, D)`` vector the network sees.
    """

    betas: Float[Tensor, "*batch T 16"]
    """SMPL-H shape coefficients, predicted for every frame (constant for ground truth)."""
    body_rotmats: Float[Tensor, "*batch T 21 3 3"]
    """Local rotations of SMPL-H body joints 1..21 (pelvis excluded) relative to their parents."""
    contacts: Float[Tensor, "*batch T 21"]
    """Contact label of each of the 21 body joints, 1 = in contact with the ground, in [0, 1]."""
    hand_rotmats: Float[Tensor, "*batch T 30 3 3"] | None = None
    """Local rotations of the 30 finger joints (15 left, then 15 right), or None without hands."""

    def __post_init__(self) -> None:
        lead = self.betas.shape[:-1]  # (..., T)
        expected = {
            "betas": (*lead, NUM_BETAS),
            "body_rotmats": (*lead, NUM_BODY_JOINTS, 3, 3),
            "contacts": (*lead, NUM_BODY_JOINTS),
        }
        if self.hand_rotmats is not None:
            expected["hand_rotmats"] = (*lead, NUM_HAND_JOINTS, 3, 3)
        for name, shape in expected.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(
                    f"MotionSample.{name} has shape {got}, expected {shape} (leading axes taken "
                    f"from betas {tuple(self.betas.shape)}); give every field the same (..., T) axes."
                )

    @property
    def include_hands(self) -> bool:
        return self.hand_rotmats is not None

    def pack(self) -> Float[Tensor, "*batch T D"]:
        """Flatten to ``(..., T, D)``: betas | body rotations row-major | contacts | hands."""
        lead = self.betas.shape[:-1]
        parts = [self.betas, self.body_rotmats.reshape(*lead, -1), self.contacts]
        if self.hand_rotmats is not None:
            parts.append(self.hand_rotmats.reshape(*lead, -1))
        return torch.cat(parts, dim=-1)

    @staticmethod
    def unpack(
        x: Float[Tensor, "*batch T D"],
        *,
        include_hands: bool,
        project_rotations: bool = False,
        clamp_contacts: bool = False,
    ) -> MotionSample:
        """Split a packed ``(..., T, D)`` vector back into fields.

        Why the options: a network's x0 prediction is not exactly a rotation or a probability.
        ``project_rotations`` replaces each 3x3 block by its nearest rotation (SVD, det +1), and
        ``clamp_contacts`` clips contacts to [0, 1]; use both when decoding samples, neither when
        a gradient or an exact round trip is wanted.
        """
        _check_packed_dim(x, include_hands)
        lead = x.shape[:-1]
        body = x[..., BODY_ROTMATS].reshape(*lead, NUM_BODY_JOINTS, 3, 3)
        hands = x[..., HAND_ROTMATS].reshape(*lead, NUM_HAND_JOINTS, 3, 3) if include_hands else None
        contacts = x[..., CONTACTS]
        if project_rotations:
            body = _project(body)
            hands = _project(hands) if hands is not None else None
        if clamp_contacts:
            contacts = contacts.clamp(0.0, 1.0)
        return MotionSample(betas=x[..., BETAS], body_rotmats=body, contacts=contacts, hand_rotmats=hands)


def _project(rotmats: Tensor) -> Tensor:
    """SO(3) projection in at least float32: the SVD has no half-precision kernels."""
    if rotmats.dtype in (torch.float16, torch.bfloat16):
        return project_to_so3(rotmats.float()).to(rotmats.dtype)
    return project_to_so3(rotmats)


def loss_weights(include_hands: bool, dtype: torch.dtype = torch.float32) -> Float[Tensor, " D"]:
    """Per-dimension weights of the x0 regression loss (docs/ego_motion_prior.md), shape (D,).

    Why: rotations dominate what the prior must get right; betas are nearly constant within a
    window, and their higher coefficients matter less (weight 0.1 / (i + 1) for coefficient i);
    contacts are auxiliary (0.1); hands are noisy in mocap and barely visible from the head (0.01).
    """
    w = torch.empty(motion_dim(include_hands), dtype=torch.float64)
    w[BETAS] = BETAS_LOSS_WEIGHT / torch.arange(1, NUM_BETAS + 1, dtype=torch.float64)
    w[BODY_ROTMATS] = BODY_ROTMATS_LOSS_WEIGHT
    w[CONTACTS] = CONTACTS_LOSS_WEIGHT
    if include_hands:
        w[HAND_ROTMATS] = HAND_ROTMATS_LOSS_WEIGHT
    return w.to(dtype)


def timestep_loss_weights(alphas_cumprod: Float[Tensor, " N"], floor: float = 0.01) -> Float[Tensor, " N"]:
    """Loss weight of every training noise level, indexed like ``scheduler.alphas_cumprod``.

    Why: with x0-prediction, an SNR weight w_t = abar_t / (1 - abar_t) turns the x0 error into the
    usual epsilon-style emphasis on low noise, where the details are decided; the floor keeps the
    noisiest steps (w ~ 0) from being ignored. Equation (docs/ego_motion_prior.md)::

        w_t = snr_t / snr_1,   snr_t = abar_t / (1 - abar_t)
        weight_t = (1 - floor) * w_t + floor          (floor = 0.01 -> 0.99 w_t + 0.01)

    EgoAllo's t = 1 is entry 0 here (see the module docstring), so ``weight[0] == 1``. Pass
    ``floor=0`` for the raw normalised SNR. Computed in float64, returned in the input dtype.
    """
    if alphas_cumprod.ndim != 1:
        raise ValueError(
            f"alphas_cumprod has shape {tuple(alphas_cumprod.shape)}, expected (N,); "
            f"pass scheduler.alphas_cumprod of a diffusers DDPM/DDIM scheduler."
        )
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor={floor} is outside [0, 1]; the method uses 0.01.")
    abar = alphas_cumprod.double()
    snr = abar / (1.0 - abar)  # (N,)
    w = snr / snr[0]
    return ((1.0 - floor) * w + floor).to(alphas_cumprod.dtype)


TimestepConvention = Literal["egoallo", "diffusers"]


REFERENCE_SAMPLING_STEPS = 30
"""EgoAllo's chain length: timesteps k^2 for k = 30..0 (docs/ego_motion_prior.md)."""


def sampling_timesteps(
    num_steps: int = REFERENCE_SAMPLING_STEPS,
    num_train_timesteps: int = 1000,
    convention: TimestepConvention = "egoallo",
) -> Int[Tensor, " {num_steps}+1"]:
    """The K + 1 timesteps of the sampling chain, noisiest first (K = num_steps network calls).

    Why quadratic spacing: steps are dense near t = 0, where the pose details are settled, and
    sparse at high noise. EgoAllo's chain (K = 30) visits k^2 for k = 30..0, and the first is raised
    to the noisiest training level so sampling starts from (almost) pure noise: (1000, 841, 784, ...,
    4, 1, 0). Other K keep that *shape*: t_k = round((30 k / K)^2) for k = K..0, first raised to the
    noisiest level, so K = 10 gives (1000, 729, 576, ..., 9, 0), not a jump from 1000 to 81.

    ``convention="egoallo"`` returns those values (t = 0 is the clean sample). ``"diffusers"``
    subtracts 1 to index ``alphas_cumprod`` directly: (999, 840, ..., 0, -1), where -1 marks the
    clean sample (alpha_bar = 1), like DDIM's ``final_alpha_cumprod``.

    Raises:
        ValueError: when the rounded timesteps are not strictly decreasing (K too large for the
            grid: 1 <= K <= :func:`max_sampling_steps`) or the grid exceeds num_train_timesteps.
    """
    limit = max_sampling_steps(num_train_timesteps)
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or not 1 <= num_steps <= limit:
        raise ValueError(
            f"num_steps={num_steps!r} must be an int in [1, {limit}] (beyond {limit}, rounding the quadratic grid "
            f"repeats timesteps); EgoAllo uses {REFERENCE_SAMPLING_STEPS} with {num_train_timesteps} training steps."
        )
    t = _quadratic_grid(num_steps)
    t[0] = num_train_timesteps
    if convention == "egoallo":
        return t
    elif convention == "diffusers":
        return t - 1
    else:
        assert_never(convention)


def _quadratic_grid(num_steps: int) -> Tensor:
    """round((30 k / K)^2) for k = K..0, as (K + 1,) int64."""
    k = torch.arange(num_steps, -1, -1, dtype=torch.float64)
    return torch.round((k * REFERENCE_SAMPLING_STEPS / num_steps) ** 2).long()


def max_sampling_steps(num_train_timesteps: int = 1000) -> int:
    """Largest K whose quadratic grid (see :func:`sampling_timesteps`) is strictly decreasing."""
    if REFERENCE_SAMPLING_STEPS**2 >= num_train_timesteps:
        raise ValueError(f"num_train_timesteps={num_train_timesteps} must exceed {REFERENCE_SAMPLING_STEPS**2}, "
                         "the top of the quadratic sampling grid.")
    best = 1
    for k in range(1, 2 * REFERENCE_SAMPLING_STEPS + 1):
        if bool((_quadratic_grid(k).diff() < 0).all()):
            best = k
    return best
