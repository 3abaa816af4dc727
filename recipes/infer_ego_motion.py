"""Full-body motion from your own Project Aria recording: MPS outputs in; an AMASS-layout body, joints and a GIF out.

    python recipes/infer_ego_motion.py --mps-dir ~/aria/my_walk/mps --output-dir runs/my_walk
    python recipes/infer_ego_motion.py --mps-dir ... --calibration ~/aria/my_walk/recording.vrs   # the unit's own CPF
    python recipes/infer_ego_motion.py --help                                                     # every flag

Steps (docs/infer_ego_motion.md walks through them):
1. Head trajectory (``aria.load_recording``): the closed-loop device poses of ``closed_loop_trajectory.csv``
   times the device-to-CPF transform (from --calibration, else Aria Gen1's CAD value), resampled to
   30 fps, turned Z-up by the measured gravity and shifted so the floor is z = 0 (floor from
   ``semidense_points.csv.gz`` when present, else from the head height).
2. Refuse a recording shorter than one window of the prior (--task.window-frames + 1 poses).
3. Sample the body over the whole recording with the prior's sampler, stitching overlapping windows
   (``sampler.sample_sequence``; noise from ``make_generator(--seed, NOISE_STREAM)``).
4. Optionally refine it with test-time optimisation (--use-tto, ``sampler.refine_decoded``).
5. Write into --output-dir: ``motion_amass.npz`` (AMASS layout, 30 fps, world +Z up, floor z = 0),
   ``joints.npz`` (per-frame joints in that world and in the MPS world, head and root poses,
   contacts, timestamps; with TTO also the joints before it), ``motion.gif`` / ``motion.png`` and
   ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import tyro

from diffgrpo.rng import make_generator
from tasks.ego_motion.body.body_model import BodyModel, load_body_model
from tasks.ego_motion.body.geometry import (
    NUM_BETAS,
    NUM_HAND_JOINTS,
    apply_transform,
    invert_transform,
    matrix_to_axis_angle,
)
from tasks.ego_motion.data.amass import TARGET_FPS, AmassSequence, save_amass_npz
from tasks.ego_motion.data.aria import AriaConfig, AriaRecording, load_recording
from tasks.ego_motion.evaluation.render import render_animation_gif, render_frames_png
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.sampling.sampler import StitchConfig, refine_decoded, sample_sequence
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import DEMO_PRIOR_PATH, EgoMotionTask, EgoMotionTaskConfig

NOISE_STREAM = "infer_ego_motion"
"""The sampler's noise comes from ``make_generator(--seed, NOISE_STREAM)``."""


@dataclass(frozen=True)
class Config:
    """Recover the wearer's body from an Aria recording's MPS outputs."""

    mps_dir: Path
    """MPS output folder of the recording: holds closed_loop_trajectory.csv (here or below, e.g. in slam/) and,
    for a measured floor, semidense_points.csv.gz."""
    output_dir: Path = Path("runs/ego_infer")
    """motion_amass.npz, joints.npz, motion.gif, motion.png and summary.json go here."""
    calibration: Path | None = None
    """The device calibration: a calibration .json or the recording's .vrs. None: Aria Gen1 CAD value
    (--aria.cad-build-version); pass it for Aria Gen2 or for millimetre accuracy."""
    prior: Path = DEMO_PRIOR_PATH
    """The prior: a denoiser .safetensors written by network.save_denoiser, or any other file or folder
    ``network.load_denoiser`` reads (as --prior of recipes/eval_ego_motion.py)."""
    seed: int = 0
    """Seeds the sampler's noise: the same seed and recording give the same motion."""
    use_tto: bool = True
    """Refine the sample with test-time optimisation (smoother, less foot skating)."""
    tto: TTOConfig = field(default_factory=TTOConfig)
    stitch: StitchConfig = field(default_factory=StitchConfig)
    """Windows of the prior's length overlapping by --stitch.overlap-frames, blended at every sampling step."""
    aria: AriaConfig = field(default_factory=AriaConfig)
    render: bool = True
    """Write motion.gif (the first --render-max-frames frames) and motion.png (8 frames over the recording)."""
    render_max_frames: int = 300
    """Frames drawn in the GIF (300 = 10 s at 30 fps; each image took about 0.3 s on a loaded 2-core machine)."""
    gif_frame_step: int = 2
    """Draw every n-th frame in the GIF."""
    num_threads: int = 1
    """torch intra-op threads (1 was fastest on a shared 2-core machine, see docs/ego_motion_eval.md)."""
    task: EgoMotionTaskConfig = field(default_factory=EgoMotionTaskConfig)

    def __post_init__(self) -> None:
        if self.stitch.window_frames != self.task.window_frames:
            raise ValueError(f"--stitch.window-frames {self.stitch.window_frames} differs from --task.window-frames "
                             f"{self.task.window_frames}; stitch windows of the length the prior was trained on.")
        for name in ("render_max_frames", "gif_frame_step", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}.")


def require_one_window(num_poses: int, window_frames: int, fps: float = TARGET_FPS) -> None:
    """Refuse a recording shorter than one window: the prior was trained on windows of ``window_frames``
    motion frames (``window_frames + 1`` head poses) and is not asked to extrapolate to shorter ones."""
    if num_poses < window_frames + 1:
        raise ValueError(f"the recording gives {num_poses} head poses at {fps:g} fps ({(num_poses - 1) / fps:.2f} s), "
                         f"shorter than one window of the prior: {window_frames + 1} poses "
                         f"({window_frames / fps:.2f} s). Record longer, or use a prior trained on shorter windows "
                         "(--task.window-frames).")


def to_amass(body: BodyModel, decoded: dict[str, torch.Tensor], fps: float) -> AmassSequence:
    """One decoded sequence (batch of 1) in the AMASS layout: root | 21 body | 30 hand rotations as axis-angle,
    trans = pelvis - J_0(betas) (``body.amass_trans_from_root``), the 16 predicted betas; identity hands
    when the prior has none."""
    T_world_root = decoded["T_world_root"][0]  # (L, 4, 4)
    num_frames = T_world_root.shape[0]
    hands = decoded.get("hand_rotmats")
    hands = (hands[0] if hands is not None
             else torch.eye(3, dtype=T_world_root.dtype).expand(num_frames, NUM_HAND_JOINTS, 3, 3))
    rotmats = torch.cat([T_world_root[:, None, :3, :3], decoded["body_rotmats"][0], hands], dim=1)  # (L, 52, 3, 3)
    betas = decoded["betas"][0]  # (16,)
    model_betas = torch.nn.functional.pad(betas, (0, body.num_betas - NUM_BETAS))
    return AmassSequence(
        poses=matrix_to_axis_angle(rotmats).reshape(num_frames, -1).numpy().astype(np.float32),
        trans=body.amass_trans_from_root(T_world_root, model_betas).numpy().astype(np.float32),
        betas=betas.numpy().astype(np.float32),
        gender="neutral",
        mocap_framerate=fps,
    )


def recording_summary(recording: AriaRecording) -> dict:
    """What the head trajectory was built from, for summary.json."""
    head_z = recording.T_world_cpf[:, 2, 3]
    return {
        "graph_uid": recording.graph_uid,
        "head_poses_30fps": len(recording.T_world_cpf),
        "duration_s": float(recording.timestamps_us[-1] - recording.timestamps_us[0]) / 1e6,
        "source_rate_hz": recording.source_rate_hz,
        "calibration": recording.calibration_source,
        "T_device_cpf": recording.T_device_cpf.tolist(),
        "gravity_tilt_deg": recording.gravity.tilt_deg,
        "gravity_spread_deg": recording.gravity.spread_deg,
        "floor": dataclasses.asdict(recording.floor),
        "median_head_height_m": float(head_z.median()),
        "T_world_mps": recording.T_world_mps.tolist(),
    }


@torch.no_grad()
def run_inference(cfg: Config) -> dict:
    """Steps 1-5 of the module docstring; returns the summary also written to summary.json."""
    torch.set_num_threads(cfg.num_threads)
    start = time.perf_counter()
    body = load_body_model(cfg.task.body_model_path)
    recording = load_recording(cfg.mps_dir, body, cfg.aria, calibration_path=cfg.calibration, fps=TARGET_FPS)  # 1
    require_one_window(len(recording.T_world_cpf), cfg.task.window_frames)  # 2
    model = load_denoiser(cfg.prior).eval()
    if model.config.include_hands != cfg.task.include_hands:
        raise ValueError(f"the prior has include_hands={model.config.include_hands} but the task "
                         f"{cfg.task.include_hands}; pass --task.include-hands {model.config.include_hands}.")
    task = EgoMotionTask(cfg.task, body=body)
    T_world_cpf = recording.T_world_cpf.to(torch.float32)[None]  # (1, L+1, 4, 4)
    load_seconds = time.perf_counter() - start

    start = time.perf_counter()
    sample = sample_sequence(task, model, T_world_cpf, generator=make_generator(cfg.seed, NOISE_STREAM),
                             stitch_cfg=cfg.stitch)  # 3
    decoded = sample.decoded
    sampling_seconds = time.perf_counter() - start
    start = time.perf_counter()
    if cfg.use_tto:
        decoded = refine_decoded(task, decoded, T_world_cpf, cfg.tto)  # 4
    tto_seconds = time.perf_counter() - start

    cfg.output_dir.mkdir(parents=True, exist_ok=True)  # 5
    joints_world = decoded["joints_world"][0]  # (L, 22, 3)
    T_mps_world = invert_transform(recording.T_world_mps).to(joints_world)
    save_amass_npz(cfg.output_dir / "motion_amass.npz", to_amass(body, decoded, TARGET_FPS))
    before_tto = {"joints_world_before_tto": sample.decoded["joints_world"][0].numpy()} if cfg.use_tto else {}
    np.savez_compressed(
        cfg.output_dir / "joints.npz",
        **before_tto,
        joints_world=joints_world.numpy(),
        joints_mps=apply_transform(T_mps_world, joints_world).numpy(),
        T_world_cpf=T_world_cpf[0, 1:].numpy(),
        T_world_root=decoded["T_world_root"][0].numpy(),
        body_rotmats=decoded["body_rotmats"][0].numpy(),
        contacts=decoded["contacts"][0].numpy(),
        betas=decoded["betas"][0].numpy(),
        timestamps_us=recording.timestamps_us[1:].numpy(),
        T_world_mps=recording.T_world_mps.numpy(),
    )
    start = time.perf_counter()
    pictures = {}
    if cfg.render:
        head = T_world_cpf[0, 1:, :3, 3]
        n = min(cfg.render_max_frames, len(joints_world))
        name = "/".join(cfg.mps_dir.resolve().parts[-2:])
        title = f"{name}: {len(joints_world) / TARGET_FPS:.1f} s" + (" (TTO)" if cfg.use_tto else "")
        pictures["gif"] = str(render_animation_gif(cfg.output_dir / "motion.gif", joints_world[:n],
                                                   head_positions=head[:n], title=title,
                                                   frame_step=cfg.gif_frame_step, gt_label="prediction"))
        pictures["png"] = str(render_frames_png(cfg.output_dir / "motion.png", joints_world, head_positions=head,
                                                title=title, gt_label="prediction"))
    summary = {
        "recording": recording_summary(recording),
        "motion_frames": len(joints_world),
        "windows": {"starts": list(sample.layout.starts), "window_frames": sample.layout.window_frames},
        "seconds": {"load": load_seconds, "sampling": sampling_seconds, "tto": tto_seconds,
                    "render": time.perf_counter() - start},
        "outputs": {"amass": str(cfg.output_dir / "motion_amass.npz"), "joints": str(cfg.output_dir / "joints.npz"),
                    **pictures},
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    (cfg.output_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(cfg: Config) -> dict:
    summary = run_inference(cfg)
    rec, seconds = summary["recording"], summary["seconds"]
    print(f"{summary['motion_frames']} frames ({rec['duration_s']:.1f} s) from {cfg.mps_dir}; floor by "
          f"{rec['floor']['method']}, world tilted {rec['gravity_tilt_deg']:.2f} deg from Z-up; CPF from "
          f"{rec['calibration']}")
    print(f"sampling {seconds['sampling']:.1f} s, TTO {seconds['tto']:.1f} s, rendering {seconds['render']:.1f} s; "
          f"wrote {', '.join(summary['outputs'].values())}")
    return summary


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(tyro.cli(Config))
