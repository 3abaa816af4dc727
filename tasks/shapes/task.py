"""The shapes task: draw a filled disc at a requested centre and radius on a 16x16 image.

Why this task exists: it is the smallest conditioned generation problem whose success is easy to
measure (overlap with the requested disc), and it uses flow matching while the flagship task uses
the DDPM family, so running GRPO on both proves the core is generic.

Units and frames (image of S x S pixels, S = 16 by default)
- Pixel (row i, column j) covers [j, j+1) x [i, i+1); its centre is at x = j + 0.5, y = i + 0.5.
  x grows to the right (columns), y grows downwards (rows).
- The raw condition is ``cond_px`` (B, 1, 3) = (cx, cy, r) in pixels. Perturbation noise is
  therefore in pixels too (``--perturb.scale 0.5`` moves the centre by about half a pixel).
- Images are (B, 1, S, S) in [-1, 1]: -1 background, +1 disc. A mask is (B, S, S) in [0, 1].

Data: conditions are drawn once, procedurally, from seeded generators (train and test use
different seeds); targets are rendered on demand. Nothing is downloaded.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import Tensor, nn

from diffgrpo.chain import SamplingChain
from diffgrpo.rollout import group_ids_for, rollout
from diffgrpo.task import Batch
from tasks.shapes.rewards import centroid_error_px, image_to_mask, mask_area_px2, soft_iou

SPLITS = ("train", "test")


@dataclass(frozen=True)
class ShapesTaskConfig:
    """Image size, condition distribution, splits and sampling chain of the shapes task."""

    image_size_px: int = 16
    """Side S of the square image, in pixels."""
    radius_range_px: tuple[float, float] = (2.0, 5.0)
    """Radii are drawn uniformly from [min, max) pixels."""
    num_train: int = 4096
    """Conditions in the train split."""
    num_test: int = 256
    """Conditions in the held-out test split."""
    train_seed: int = 0
    """Seed of the generator that draws the train conditions."""
    test_seed: int = 1
    """Seed of the test conditions; must differ from train_seed so the splits differ."""
    num_sampling_steps: int = 10
    """K: steps of the sampling chain (sigma from 1 to 0 in K equal steps)."""
    num_train_timesteps: int = 1000
    """Flow-match timestep scale: t = sigma * num_train_timesteps (diffusers convention)."""

    def __post_init__(self) -> None:
        r_min, r_max = self.radius_range_px
        if not 0.5 <= r_min < r_max:
            raise ValueError(f"radius_range_px must satisfy 0.5 <= min < max, got {self.radius_range_px}; "
                             "fix --task.radius-range-px.")
        if 2 * (r_max + 0.5) > self.image_size_px:
            raise ValueError(f"a disc of radius {r_max} px (plus its half-pixel soft edge) does not fit in "
                             f"{self.image_size_px} px; lower --task.radius-range-px or raise "
                             "--task.image-size-px.")
        if self.train_seed == self.test_seed:
            raise ValueError(f"train_seed and test_seed are both {self.train_seed}: the splits would "
                             "coincide; pass a different --task.test-seed.")
        if self.num_train < 1 or self.num_test < 1:
            raise ValueError(f"splits must be non-empty, got num_train={self.num_train}, "
                             f"num_test={self.num_test}; fix --task.num-train / --task.num-test.")
        if self.num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {self.num_sampling_steps}")


def sample_disc_conditions(n: int, cfg: ShapesTaskConfig, generator: torch.Generator) -> Tensor:
    """(n, 3) conditions (cx, cy, r) in pixels, with the whole soft-edged disc inside the image.

    r ~ U[r_min, r_max); cx, cy ~ U[r + 0.5, S - r - 0.5) so that no pixel of the disc is cut off.
    """
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    r_min, r_max = cfg.radius_range_px
    radius = r_min + u[:, 2] * (r_max - r_min)
    margin = radius + 0.5
    span = cfg.image_size_px - 2 * margin
    cx = margin + u[:, 0] * span
    cy = margin + u[:, 1] * span
    return torch.stack([cx, cy, radius], dim=1).float()


def pixel_centres(image_size_px: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """(S, S) x and y coordinates of the pixel centres: x[i, j] = j + 0.5, y[i, j] = i + 0.5."""
    coords = torch.arange(image_size_px, device=device, dtype=dtype) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    return x, y


def render_disc_mask(cond_px: Tensor, image_size_px: int) -> Tensor:
    """Anti-aliased coverage (B, S, S) in [0, 1] of discs (B, 3) = (cx, cy, r) in pixels.

    Each pixel's coverage is clamp(r + 0.5 - d, 0, 1) with d the distance from its centre to
    (cx, cy): a one-pixel linear ramp across the edge. For r >= 2 its area is pi r^2 within 5 %
    (1 % on average) and its centroid is (cx, cy) within 0.05 px.
    """
    x, y = pixel_centres(image_size_px, device=cond_px.device, dtype=cond_px.dtype)
    cx, cy, r = (cond_px[:, k, None, None] for k in range(3))
    dist = torch.sqrt((x - cx) ** 2 + (y - cy) ** 2)  # (B, S, S)
    return (r + 0.5 - dist).clamp(0.0, 1.0)


def condition_maps(cond_px: Tensor, image_size_px: int) -> Tensor:
    """(B, 3, S, S) model conditioning from (B, 3) discs: (x - cx, y - cy, r) / (S / 2).

    Why maps: see ``tasks.shapes.model``; dividing by S/2 keeps every channel within about [-2, 2].
    """
    half = image_size_px / 2
    x, y = pixel_centres(image_size_px, device=cond_px.device, dtype=cond_px.dtype)
    cx, cy, r = (cond_px[:, k, None, None] for k in range(3))
    dx = (x - cx) / half  # (B, S, S)
    dy = (y - cy) / half
    radius = (r / half).expand_as(dx)
    return torch.stack([dx, dy, radius], dim=1)


class ShapesTask:
    """The shapes task as a :class:`diffgrpo.task.Task`.

    Batch keys
    - ``cond_px`` (B, 1, 3): the raw, perturbable condition (cx, cy, r) in pixels.
    - ``target`` (B, 1, S, S): the requested disc rendered as an image in [-1, 1]. It stays the
      requested disc when the condition is perturbed: rewards score what was asked for.
    """

    def __init__(self, cfg: ShapesTaskConfig | None = None) -> None:
        self.cfg = cfg or ShapesTaskConfig()
        size = self.cfg.image_size_px
        self.sample_shape: tuple[int, ...] = (1, size, size)
        self._conditions = {
            "train": sample_disc_conditions(self.cfg.num_train, self.cfg, _seeded(self.cfg.train_seed)),
            "test": sample_disc_conditions(self.cfg.num_test, self.cfg, _seeded(self.cfg.test_seed)),
        }  # split -> (num_examples, 3) in pixels

    # -- diffusion ---------------------------------------------------------------------------------
    def make_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        """Flow matching with x_t = (1 - sigma) x0 + sigma noise and velocity v = noise - x0."""
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.cfg.num_train_timesteps, shift=1.0)

    def sampling_timesteps(self) -> Tensor:
        """(K+1,) t = sigma * num_train_timesteps for sigma = 1, 1 - 1/K, ..., 0."""
        sigmas = torch.linspace(1.0, 0.0, self.cfg.num_sampling_steps + 1)
        return sigmas * self.cfg.num_train_timesteps

    # -- data --------------------------------------------------------------------------------------
    def num_examples(self, split: str) -> int:
        return self._split(split).shape[0]

    def load_examples(self, split: str, indices: Tensor) -> Batch:
        """Batch of the examples at ``indices`` (B,): ``cond_px`` (B, 1, 3), ``target`` (B, 1, S, S)."""
        conditions = self._split(split)
        indices = torch.as_tensor(indices, dtype=torch.long)
        if indices.ndim != 1:
            raise ValueError(f"indices must be 1-D (B,), got shape {tuple(indices.shape)}")
        if len(indices) and (int(indices.min()) < 0 or int(indices.max()) >= len(conditions)):
            raise IndexError(f"indices must lie in [0, {len(conditions)}) for split {split!r}, got "
                             f"[{int(indices.min())}, {int(indices.max())}]")
        cond = conditions[indices]  # (B, 3)
        target = 2.0 * render_disc_mask(cond, self.cfg.image_size_px) - 1.0  # (B, S, S)
        return {"cond_px": cond[:, None, :], "target": target[:, None]}

    def raw_condition(self, batch: Batch) -> Tensor:
        return batch["cond_px"]

    def with_raw_condition(self, batch: Batch, raw: Tensor) -> Batch:
        if raw.shape != batch["cond_px"].shape:
            raise ValueError(f"raw condition has shape {tuple(raw.shape)}, expected "
                             f"{tuple(batch['cond_px'].shape)} (B, 1, 3); perturbers must keep the shape.")
        return {**batch, "cond_px": raw}

    def encode_condition(self, batch: Batch) -> Tensor:
        """(B, 3, S, S) coordinate maps of the (possibly perturbed) condition."""
        return condition_maps(batch["cond_px"][:, 0], self.cfg.image_size_px)

    # -- network -----------------------------------------------------------------------------------
    def predict(self, model: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Velocity (N, 1, S, S) for x_t (N, 1, S, S) at t (N,) with condition maps (N, 3, S, S)."""
        if x_t.shape[1:] != self.sample_shape or cond.shape[0] != x_t.shape[0] or t.shape != x_t.shape[:1]:
            raise ValueError(f"predict got x_t {tuple(x_t.shape)}, t {tuple(t.shape)}, "
                             f"cond {tuple(cond.shape)}; expected (N, *{self.sample_shape}), (N,), "
                             "(N, 3, S, S).")
        model_input = torch.cat([x_t, cond.to(x_t.dtype)], dim=1)  # (N, 4, S, S)
        return model(model_input, t).sample

    # -- outputs -----------------------------------------------------------------------------------
    def decode(self, x0: Tensor, batch: Batch) -> Mapping[str, Tensor]:
        """``mask`` (N, S, S): the coverage in [0, 1] drawn by samples (N, 1, S, S)."""
        return {"mask": image_to_mask(x0)}

    def evaluate(self, decoded: Mapping[str, Tensor], batch: Batch) -> dict[str, Tensor]:
        """Per-sample (N,) soft IoU, centroid error in pixels, area error in square pixels."""
        mask, target = decoded["mask"], image_to_mask(batch["target"])
        return {
            "iou": soft_iou(mask, target),
            "centroid_error_px": centroid_error_px(mask, target),
            "area_error_px2": (mask_area_px2(mask) - mask_area_px2(target)).abs(),
        }

    def _split(self, split: str) -> Tensor:
        if split not in self._conditions:
            raise KeyError(f"unknown split {split!r}; the shapes task has {SPLITS}")
        return self._conditions[split]


def _seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def disc_area_px2(radius_px: Tensor) -> Tensor:
    """Exact area pi r^2 of a disc, the value the rendered coverage approximates."""
    return math.pi * radius_px**2


@torch.no_grad()
def sample_images(task: ShapesTask, model: nn.Module, batch: Batch, *, generator: torch.Generator,
                  chain: SamplingChain, micro_batch_size: int | None = None) -> Tensor:
    """Final samples (B, 1, S, S), one chain per example of ``batch``, run by ``diffgrpo.rollout``.

    Why a helper: looking at (or plotting) what a model draws needs plain, ungrouped sampling; it
    is a group size of one in the core's rollout, so the chain is the very one GRPO samples
    (held-out metrics use ``diffgrpo.evaluate``, which seeds each example's noise). A chain with
    ``sampler.eta = 0`` (``SamplingChain.of(task, SamplerConfig(eta=0.0))``) gives the deterministic
    flow ODE (Euler), ``eta > 0`` the flow SDE used for GRPO.
    """
    cond = task.encode_condition(batch)  # (B, 3, S, S)
    group_ids = group_ids_for(cond.shape[0], 1, device=cond.device)
    trajectory = rollout(
        lambda x_t, t, c: task.predict(model, x_t, t, c), chain, cond, group_ids, generator=generator,
        micro_batch_size=micro_batch_size,
    )
    return trajectory.samples

