"""Sampling body motion from the prior: one window, a long sequence stitched from windows, a held-out evaluation.

Why every path goes through ``diffgrpo.rollout.rollout``: the sampler that is evaluated here is
then, bit for bit, the policy GRPO post-trains (EgoAllo's step, ``chain.step_with_logprob`` method
'egoallo'); no second sampling loop can drift from it.

Long sequences (docs/ego_motion_prior.md): a clip of L motion frames (L+1 head poses) is covered by
windows of ``window_frames`` frames that overlap by ``overlap_frames`` (the last window is moved
back to end at frame L, so every window has the same length and they all run as one batch of
chains). Window k covers motion frames s_k .. s_k + w - 1 and is conditioned on its own w + 1 head
poses ``T_world_cpf[s_k : s_k + w + 1]``. At every sampling step each window predicts x0, the
predictions are averaged per frame in packed x0 space with weights that ramp up linearly over a
window's first ``overlap_frames`` frames (the first window has full weight from its start), and
every window continues from the averaged x0, so neighbouring windows are pulled towards one
motion throughout sampling rather than blended only at the end. The last step is deterministic
and lands on the averaged x0, so the windows agree exactly where they overlap; the stitched x0 is
decoded once over the whole clip (root from head, FK).

Shapes: B sequences or windows, W windows per sequence, w frames per window, L frames per
sequence, D packed motion size (226), N chains.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from jaxtyping import Float
from torch import Tensor, nn
from tqdm.auto import tqdm

from diffgrpo.chain import SamplingChain
from diffgrpo.modes import evaluation_mode
from diffgrpo.rng import make_generator
from diffgrpo.rollout import Trajectory, group_ids_for, rollout
from diffgrpo.task import Batch
from tasks.ego_motion.body.body_model import pose_from_head
from tasks.ego_motion.data.sequences import MotionSequence, load_sequence
from tasks.ego_motion.model.condition import encode_head_trajectory
from tasks.ego_motion.sampling.tto import TTOConfig, optimize_motion
from tasks.ego_motion.task import EgoMotionTask, decode_motion

# ---------------------------------------------------------------------------------------------
# One window


def sample_motion(
    task: EgoMotionTask,
    model: nn.Module,
    batch: Batch,
    *,
    generator: torch.Generator,
    chain: SamplingChain | None = None,
    group_ids: Tensor | None = None,
    micro_batch_size: int | None = None,
) -> Trajectory:
    """One chain per window of ``batch`` (B windows of T+1 head poses), run by the core rollout.

    The window length is read from the batch (any T works: the denoiser uses relative positions).
    ``chain`` defaults to the task's evaluation chain (EgoAllo's step, eta 0.8, '+0.1', K =
    ``--task.num-sampling-steps``); it is used at the batch's window length. ``group_ids`` (B,)
    default 0..B-1; each id draws its own initial noise. Returns the trajectory: ``.samples``
    (B, T, D) final x0, ``.x0_preds`` (B, K, T, D) per-step predictions (decode them with
    ``task.decode_x0``). Deterministic given the generator's state.
    """
    T_world_cpf = batch["T_world_cpf"]
    num_windows, num_frames = T_world_cpf.shape[0], T_world_cpf.shape[1] - 1
    cond = task.encode_condition(batch)  # (B, T, 154)
    if group_ids is None:
        group_ids = group_ids_for(num_windows, 1, device=cond.device)
    chain = (chain or task.sampling_chain()).with_sample_shape((num_frames, task.sample_shape[-1]))
    return rollout(lambda x_t, t, c: task.predict(model, x_t, t, c), chain, cond, group_ids, generator=generator,
                   micro_batch_size=micro_batch_size)


# ---------------------------------------------------------------------------------------------
# Stitching windows into a long sequence


@dataclass(frozen=True)
class StitchConfig:
    """How a long sequence is cut into overlapping windows and blended back."""

    window_frames: int = 64
    """w, motion frames per window (use the prior's training length: 64 demo, 128 reference)."""
    overlap_frames: int = 16
    """Frames shared by consecutive windows (EgoAllo: 32 for 128-frame windows; a quarter by default)."""
    use_ramp_down: bool = False
    """Also ramp a window's weight down over its last overlap frames when another window follows. The
    reference ramps up only, so the blend jumps from about 1/2 to 1 where the earlier window ends; with
    the ramp-down the two weights sum to 1 across a regular overlap (a linear crossfade)."""
    use_merge_every_step: bool = True
    """Average the windows' x0 predictions at every step (default) rather than only their final samples."""

    def __post_init__(self) -> None:
        if self.window_frames < 1 or not 0 <= self.overlap_frames < self.window_frames:
            raise ValueError(f"need window_frames >= 1 and 0 <= overlap_frames < window_frames, got "
                             f"window_frames={self.window_frames}, overlap_frames={self.overlap_frames}; "
                             "fix --stitch.window-frames / --stitch.overlap-frames.")


@dataclass(frozen=True)
class WindowLayout:
    """Windows covering L frames: start frames and per-frame blend weights that sum to 1 over windows."""

    num_frames: int
    """L, motion frames of the sequence."""
    starts: tuple[int, ...]
    """s_k, first motion frame of window k (ascending; the last window ends at L)."""
    window_frames: int
    """w = min(window_frames, L): every window has this many frames."""
    weights: Float[Tensor, "W w"]
    """Normalised blend weight of each window's frames: for every frame f, the weights of the windows
    covering it sum to 1."""


def window_layout(num_frames: int, cfg: StitchConfig) -> WindowLayout:
    """Starts every w - overlap frames, the last moved to L - w; weights ramp up (and optionally down).

    Raw weight of frame i of window k: r_up(i) = (i + 1) / (overlap + 1) for i < overlap when k > 0
    (else 1), times r_down(i) = (w - i) / (overlap + 1) for i >= w - overlap when ``use_ramp_down``
    and k < W - 1 (else 1); then divided by the per-frame sum over windows. A sequence of at most
    w frames is one window with weight 1.
    """
    if num_frames < 1:
        raise ValueError(f"a sequence needs at least 1 motion frame (2 head poses), got {num_frames}.")
    w = min(cfg.window_frames, num_frames)
    if num_frames <= cfg.window_frames:
        return WindowLayout(num_frames, (0,), w, torch.ones(1, w, dtype=torch.float64))
    overlap, stride = cfg.overlap_frames, cfg.window_frames - cfg.overlap_frames
    starts = list(range(0, num_frames - w + 1, stride))
    if starts[-1] + w < num_frames:
        starts.append(num_frames - w)
    i = torch.arange(w, dtype=torch.float64)
    ramp_up = ((i + 1) / (overlap + 1)).clamp(max=1.0)  # (w,)
    ramp_down = ((w - i) / (overlap + 1)).clamp(max=1.0)
    raw = torch.ones(len(starts), w, dtype=torch.float64)
    raw[1:] *= ramp_up
    if cfg.use_ramp_down:
        raw[:-1] *= ramp_down
    total = torch.zeros(num_frames, dtype=torch.float64)
    for k, s in enumerate(starts):
        total[s : s + w] += raw[k]
    weights = torch.stack([raw[k] / total[s : s + w] for k, s in enumerate(starts)])
    return WindowLayout(num_frames, tuple(starts), w, weights)


def stitch(windows: Float[Tensor, "B W w D"], layout: WindowLayout) -> Float[Tensor, "B L D"]:
    """Blend per-window values into one sequence: out[f] = sum_k weight_k(f) windows_k(f)."""
    B, W, w, D = windows.shape
    if (W, w) != (len(layout.starts), layout.window_frames):
        raise ValueError(f"got {W} windows of {w} frames, the layout has {len(layout.starts)} of "
                         f"{layout.window_frames}; stitch what unstitch(…, layout) produced.")
    out = windows.new_zeros(B, layout.num_frames, D)
    weights = layout.weights.to(windows)
    for k, s in enumerate(layout.starts):
        out[:, s : s + w] += weights[k, :, None] * windows[:, k]
    return out


def unstitch(sequence: Float[Tensor, "B L D"], layout: WindowLayout) -> Float[Tensor, "B W w D"]:
    """The frames of every window of ``layout`` cut from a sequence (B, L, ...) -> (B, W, w, ...)."""
    w = layout.window_frames
    return torch.stack([sequence[:, s : s + w] for s in layout.starts], dim=1)


@dataclass(frozen=True)
class StitchedSample:
    """A long-sequence sample: the blended packed motion, its decoded body and the window chains."""

    x0: Float[Tensor, "B L D"]
    """Stitched packed motion."""
    decoded: dict[str, Tensor]
    """``decode_motion`` of x0 on the whole head trajectory (joints_world (B, L, 22, 3), ...)."""
    layout: WindowLayout
    trajectory: Trajectory
    """The B x W window chains (chain b * W + k is window k of sequence b)."""


@torch.no_grad()
def sample_sequence(
    task: EgoMotionTask,
    model: nn.Module,
    T_world_cpf: Float[Tensor, "B Lp1 4 4"],
    *,
    generator: torch.Generator,
    stitch_cfg: StitchConfig | None = None,
    chain: SamplingChain | None = None,
) -> StitchedSample:
    """Sample B sequences of L motion frames from their L+1 head poses by stitching windows (module doc).

    All B x W windows run as one batch of chains through the core rollout (the per-step averaging
    needs every window's prediction at once); chain b * W + k has group id b * W + k, so its initial
    noise is its own. When L <= window_frames this is exactly :func:`sample_motion` on the sequence.
    """
    stitch_cfg = stitch_cfg or StitchConfig(window_frames=task.cfg.window_frames,
                                            overlap_frames=task.cfg.window_frames // 4)
    if T_world_cpf.ndim != 4 or T_world_cpf.shape[-2:] != (4, 4) or T_world_cpf.shape[1] < 2:
        raise ValueError(f"T_world_cpf must be (B, L+1, 4, 4) head poses with L >= 1, got {tuple(T_world_cpf.shape)}.")
    B = T_world_cpf.shape[0]
    layout = window_layout(T_world_cpf.shape[1] - 1, stitch_cfg)
    W, w = len(layout.starts), layout.window_frames
    head_windows = torch.stack([T_world_cpf[:, s : s + w + 1] for s in layout.starts], dim=1)  # (B, W, w+1, 4, 4)
    cond = encode_head_trajectory(head_windows.flatten(0, 1))  # (B*W, w, 154)

    def merged_predict(x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        x0 = task.predict(model, x_t, t, c)  # (B*W, w, D)
        if not stitch_cfg.use_merge_every_step or W == 1:
            return x0
        if x0.shape[0] != B * W:
            raise RuntimeError(f"the merged predictor got {x0.shape[0]} chains, expected all {B * W} windows at once.")
        return unstitch(stitch(x0.reshape(B, W, w, -1), layout), layout).reshape(x0.shape)

    chain = (chain or task.sampling_chain()).with_sample_shape((w, task.sample_shape[-1]))
    trajectory = rollout(merged_predict, chain, cond, group_ids_for(B * W, 1, device=cond.device), generator=generator)
    x0 = stitch(trajectory.samples.reshape(B, W, w, -1), layout)  # (B, L, D)
    decoded = decode_motion(task.body, x0, T_world_cpf, include_hands=task.cfg.include_hands)
    return StitchedSample(x0=x0, decoded=decoded, layout=layout, trajectory=trajectory)


# ---------------------------------------------------------------------------------------------
# Whole clips from AMASS-layout files


def clip_batch(sequence: MotionSequence) -> Batch:
    """A whole processed clip as a one-element batch in the window layout (T = N - 1 motion frames).

    Head poses 0..N-1 condition motion frames 1..N-1, exactly as a window starting at frame 0.
    """
    target = slice(1, None)
    return {
        "T_world_cpf": sequence.T_world_cpf[None],  # (1, N, 4, 4)
        "betas": sequence.betas[None],
        "body_rotmats": sequence.body_rotmats[None, target],
        "hand_rotmats": sequence.hand_rotmats[None, target],
        "contacts": sequence.contacts[None, target],
        "T_world_root": sequence.T_world_root[None, target],
        "joints_world": sequence.joints_world[None, target],
    }


def load_clip(task: EgoMotionTask, path: str | Path) -> Batch:
    """Read an AMASS-layout ``.npz`` (resampled to 30 fps, FK, contacts, headset) as a :func:`clip_batch`.

    Any clip of at least 2 frames loads (a clip shorter than a window is sampled as one short window).
    """
    any_length = dataclasses.replace(task.cfg.window_config(), window_frames=1)  # only the length check differs
    with torch.no_grad():
        sequence = load_sequence(Path(path), task.body, any_length)
    return clip_batch(sequence)


def sample_clip(
    task: EgoMotionTask,
    model: nn.Module,
    path: str | Path,
    *,
    generator: torch.Generator,
    stitch_cfg: StitchConfig | None = None,
    chain: SamplingChain | None = None,
) -> tuple[Batch, StitchedSample]:
    """The clip's batch (ground truth) and a stitched sample of its whole length."""
    batch = load_clip(task, path)
    return batch, sample_sequence(task, model, batch["T_world_cpf"], generator=generator,
                                  stitch_cfg=stitch_cfg, chain=chain)


# ---------------------------------------------------------------------------------------------
# Test-time optimisation of decoded samples


def refine_decoded(task: EgoMotionTask, decoded: dict[str, Tensor], T_world_cpf: Tensor,
                   tto_cfg: TTOConfig | None = None) -> dict[str, Tensor]:
    """``decoded`` with its rotations refined by ``tto.optimize_motion`` and the body re-posed from the head.

    T_world_cpf: the head the sample was decoded on: the window's (B, T+1, 4, 4) poses (the first only conditions
    frame 0) or the (B, T, 4, 4) poses aligned with the motion frames (``decoded["T_world_cpf"]``). Betas and
    contacts are kept. A row with NaN or inf in its head, betas, rotations or contacts is returned as it is (its
    metrics are then non-finite too); the finite rows are refined together (with L-BFGS, a row's result depends on
    its batch mates: ``TTOConfig.optimizer``).

    Raises:
        ValueError: from ``tto.optimize_motion``: ``T_world_cpf`` has neither T+1 nor T frames, or the rotations are
            not rotations.
    """
    rotmats, contacts = decoded["body_rotmats"], decoded["contacts"]
    B = rotmats.shape[0]
    finite = torch.ones(B, dtype=torch.bool, device=rotmats.device)
    for value in (T_world_cpf, decoded["betas"], rotmats, contacts):
        finite &= torch.isfinite(value.reshape(B, -1)).all(dim=1)
    if not finite.all():
        rows = torch.nonzero(finite).flatten()
        out = {key: value.clone() if isinstance(value, Tensor) else value for key, value in decoded.items()}
        if len(rows):
            part = {key: value[rows] if isinstance(value, Tensor) and value.shape[:1] == (B,) else value
                    for key, value in decoded.items()}
            for key, value in refine_decoded(task, part, T_world_cpf[rows], tto_cfg).items():
                if isinstance(value, Tensor) and key in out and out[key].shape[:1] == (B,):
                    out[key][rows] = value.to(out[key])
        return out
    betas = torch.nn.functional.pad(decoded["betas"], (0, task.body.num_betas - decoded["betas"].shape[-1]))
    result = optimize_motion(task.body, T_world_cpf, betas, rotmats, contacts, tto_cfg)
    aligned = T_world_cpf[:, -rotmats.shape[1]:]  # the last T poses: motion frame t is pose t+1
    posed = pose_from_head(task.body, aligned.to(betas), result.body_rotmats, betas, decoded.get("hand_rotmats"))
    return {**decoded, **posed, "body_rotmats": result.body_rotmats}


# ---------------------------------------------------------------------------------------------
# Held-out evaluation


@dataclass(frozen=True)
class WindowEvaluation:
    """Per-window metrics of one seeded pass over a split, with and without test-time optimisation."""

    indices: Tensor
    """(n,) window indices of the split, in evaluation order."""
    metrics: dict[str, dict[str, Tensor]]
    """variant ('base', and 'tto' when requested) -> metric name (``task.METRIC_UNITS``) -> (n,) values.
    Both variants score the very same samples: 'tto' refines 'base'."""
    joints_world: dict[str, Tensor] | None
    """variant -> (n, T, 22, 3) predicted joints (world metres) when ``keep_joints``, else None."""
    sampling_seconds: float
    """Wall time spent sampling (rollout + decode), for throughput."""
    tto_seconds: float
    """Wall time spent in test-time optimisation (0 without)."""


@torch.no_grad()
def evaluate_windows(
    task: EgoMotionTask,
    model: nn.Module,
    split: str = "test",
    *,
    seed: int,
    use_tto: bool = False,
    tto_cfg: TTOConfig | None = None,
    batch_size: int = 32,
    max_windows: int | None = None,
    chain: SamplingChain | None = None,
    keep_joints: bool = False,
    progress: bool = True,
    extra_metrics: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> WindowEvaluation:
    """Sample every window of ``split`` once, optionally refine with TTO, and score both against ground truth.

    Why not ``diffgrpo.evaluate.evaluate``: TTO sits between sampling and metrics. The noise is
    drawn exactly as there (a batch's generator is seeded by (seed, "eval", its first index) and
    group ids are the window indices), so the 'base' metrics equal ``diffgrpo.evaluate.evaluate``'s
    for the same seed and batch size; base and post-trained models evaluated with the same
    settings see the same noise. ``extra_metrics(decoded)`` adds ground-truth-free measures per
    window ((B,) tensors, e.g. ``physics.evaluator.PhysicsEvaluator.evaluate``) to every variant.
    """
    device = next(model.parameters()).device
    n_total = task.num_examples(split) if max_windows is None else min(max_windows, task.num_examples(split))
    indices = torch.arange(n_total)
    with evaluation_mode(model):
        variants = ("base", "tto") if use_tto else ("base",)
        values: dict[str, dict[str, list[Tensor]]] = {v: {} for v in variants}
        joints: dict[str, list[Tensor]] = {v: [] for v in variants}
        sampling_seconds = tto_seconds = 0.0
        for idx in tqdm(indices.split(batch_size), desc=f"ego_motion eval {split}", disable=not progress, leave=False):
            batch = {k: v.to(device) for k, v in task.load_examples(split, idx).items()}
            generator = make_generator(seed, "eval", int(idx[0]), device=device)
            start = time.perf_counter()
            trajectory = sample_motion(task, model, batch, generator=generator, chain=chain,
                                       group_ids=idx.to(device))
            decoded = {"base": task.decode(trajectory.samples, batch)}
            sampling_seconds += time.perf_counter() - start
            if use_tto:
                start = time.perf_counter()
                decoded["tto"] = refine_decoded(task, decoded["base"], batch["T_world_cpf"], tto_cfg)
                tto_seconds += time.perf_counter() - start
            for variant in variants:
                measures = task.evaluate(decoded[variant], batch)
                if extra_metrics is not None:
                    measures.update(extra_metrics(decoded[variant]))
                for name, value in measures.items():
                    values[variant].setdefault(name, []).append(value.float().cpu())
                if keep_joints:
                    joints[variant].append(decoded[variant]["joints_world"].cpu())
    return WindowEvaluation(
        indices=indices,
        metrics={v: {name: torch.cat(parts) for name, parts in per.items()} for v, per in values.items()},
        joints_world={v: torch.cat(parts) for v, parts in joints.items()} if keep_joints else None,
        sampling_seconds=sampling_seconds,
        tto_seconds=tto_seconds,
    )
