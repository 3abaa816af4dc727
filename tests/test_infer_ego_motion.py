"""Inference on an Aria recording: MPS files -> CPF trajectory -> gravity and floor -> stitched sampling -> outputs.

The recordings here are synthetic MPS folders made from a held-out (test-split) CMU clip: its
ground-truth CPF poses, moved into an MPS-like world (yawed, shifted, floor at z = -1.55 m) and
turned into *device* poses through a known device-to-CPF transform, written with the real column
names of ``closed_loop_trajectory.csv`` and ``semidense_points.csv.gz``.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
import torch

import recipes.infer_ego_motion as infer_ego_motion_recipe
from diffgrpo.rng import make_generator
from tasks.ego_motion.body.body_model import load_body_model
from tasks.ego_motion.body.geometry import (
    apply_transform,
    axis_angle_to_matrix,
    invert_transform,
    make_transform,
    matrix_to_axis_angle,
    matrix_to_quaternion,
)
from tasks.ego_motion.data import aria
from tasks.ego_motion.data.sequences import WindowConfig, load_sequence
from tasks.ego_motion.data.splits import BUNDLED_CMU_DIR
from tasks.ego_motion.evaluation.metrics import mpjpe
from tasks.ego_motion.model.condition import raw_head_features
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.sampling.sampler import StitchConfig, load_clip, refine_decoded, sample_clip, sample_sequence
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import DEMO_PRIOR_PATH, EgoMotionTask, EgoMotionTaskConfig

needs_aria = pytest.mark.skipif(find_spec("projectaria_tools") is None,
                                reason="projectaria-tools not installed (pip install -e '.[dev]')")

T = 64
CLIP = BUNDLED_CMU_DIR / "005_01.npz"  # test split; 149 frames at 30 fps = 148 motion frames, 3 windows of 64
FLOOR_Z_MPS = -1.55
CLOSED_LOOP_HEADER = (
    *aria.CLOSED_LOOP_COLUMNS, "geo_available",
    "tx_ecef_device", "ty_ecef_device", "tz_ecef_device",
    "qx_ecef_device", "qy_ecef_device", "qz_ecef_device", "qw_ecef_device",
)  # fmt: skip


@pytest.fixture(scope="module")
def body():
    return load_body_model()


@pytest.fixture(scope="module")
def task(body, tmp_path_factory):
    return EgoMotionTask(EgoMotionTaskConfig(window_frames=T, cache_dir=tmp_path_factory.mktemp("cache")), body=body)


@pytest.fixture(scope="module")
def clip(task):
    """The clip's ground truth: T_world_cpf (1, 149, 4, 4), joints_world (1, 148, 22, 3), ..."""
    return load_clip(task, CLIP)


# ---------------------------------------------------------------------------------------------
# Synthetic MPS folders


def T_mps_world_example() -> torch.Tensor:
    """An MPS-like world: yawed by 40 degrees, origin elsewhere, floor at z = FLOOR_Z_MPS."""
    R = axis_angle_to_matrix(torch.tensor([0.0, 0.0, math.radians(40.0)], dtype=torch.float64))
    return make_transform(R, torch.tensor([3.0, -2.0, FLOOR_Z_MPS], dtype=torch.float64))


def floor_points_world(head_xy: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(P, 3) semi-dense-like points in the clip's world: a noisy floor around the path, a table top and
    walls that hold more points than the floor, a ceiling, and a few stray points below the floor."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = head_xy.min(0).values - 1.5, head_xy.max(0).values + 1.5

    def uniform(n: int, z_lo: float, z_hi: float) -> torch.Tensor:
        xy = lo + (hi - lo) * torch.rand(n, 2, generator=g, dtype=torch.float64)
        return torch.cat([xy, z_lo + (z_hi - z_lo) * torch.rand(n, 1, generator=g, dtype=torch.float64)], dim=1)

    floor = uniform(1500, 0.0, 0.0)
    floor[:, 2] += 0.005 * torch.randn(1500, generator=g, dtype=torch.float64)
    table = uniform(3000, 0.74, 0.76)  # denser than the floor: the lowest *supported* band must win
    walls = uniform(4000, 0.0, 2.6)
    ceiling = uniform(1000, 2.6, 2.62)
    below = uniform(15, -0.6, -0.05)  # reflections / noise under the floor
    return torch.cat([floor, table, walls, ceiling, below])


def write_mps_folder(
    folder: Path,
    T_world_cpf: torch.Tensor,
    T_device_cpf: torch.Tensor,
    *,
    T_mps_world: torch.Tensor | None = None,
    points_world: torch.Tensor | None = None,
    fps: float = 30.0,
    gravity_mps: torch.Tensor | None = None,
) -> Path:
    """Write ``closed_loop_trajectory.csv`` (+ ``semidense_points.csv.gz``) in MPS's layout; returns the folder.

    T_world_cpf: (N, 4, 4) CPF poses in a Z-up world with the floor at z = 0. Device poses are
    T_mps_device = T_mps_world T_world_cpf inv(T_device_cpf); gravity is R_mps_world (0, 0, -9.81)
    unless given; timestamps are integer microseconds at ``fps`` starting at 12.345678 s.
    """
    T_mps_world = T_mps_world_example() if T_mps_world is None else T_mps_world
    T_mps_device = T_mps_world @ T_world_cpf.to(torch.float64) @ invert_transform(T_device_cpf)
    q = matrix_to_quaternion(T_mps_device[:, :3, :3])  # (N, 4) wxyz
    if gravity_mps is None:
        gravity_mps = T_mps_world[:3, :3] @ torch.tensor([0.0, 0.0, -9.81], dtype=torch.float64)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / aria.CLOSED_LOOP_FILE, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CLOSED_LOOP_HEADER)
        for k in range(len(T_mps_device)):
            t_us = 12_345_678 + round(k * 1e6 / fps)
            x, y, z = T_mps_device[k, :3, 3].tolist()
            writer.writerow(["g0", t_us, 1_700_000_000_000_000_000 + 1000 * t_us, x, y, z, *q[k, 1:].tolist(),
                             float(q[k, 0]), 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, *gravity_mps.tolist(), 1.0, 0,
                             0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    if points_world is not None:
        points_mps = apply_transform(T_mps_world, points_world)
        with gzip.open(folder / aria.SEMIDENSE_POINTS_FILE, "wt", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(aria.SEMIDENSE_COLUMNS)
            for i, (x, y, z) in enumerate(points_mps.tolist()):
                confident = i % 10 != 0  # every tenth point is too uncertain and must be filtered out
                writer.writerow([i, "g0", x, y, z, 0.0005 if confident else 0.01, 0.01 if confident else 0.2])
    return folder


def calibration_json(path: Path, build: str = "DVT-L") -> Path:
    """A device calibration file projectaria-tools reads; its CPF is the CAD value of ``build``."""
    path.write_text(json.dumps({"DeviceClassInfo": {"BuildVersion": build, "DeviceClass": "Aria"},
                                "OriginSpecification": {"Type": "Custom", "ChildLabel": "camera-slam-left"}}))
    return path


def rewrite_rows(path: Path, edit) -> None:
    """Apply ``edit(rows)`` to the data rows (lists of strings) of a CSV, keeping the header."""
    with open(path, newline="") as f:
        header, *rows = list(csv.reader(f))
    edit(header, rows)
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


# ---------------------------------------------------------------------------------------------
# The whole recipe against the evaluation on the same clip


@needs_aria
def test_recipe_on_a_synthetic_recording_matches_the_evaluation_of_the_same_clip(tmp_path, task, clip, body):
    recipe = infer_ego_motion_recipe
    calibration = calibration_json(tmp_path / "calibration.json", "DVT-L")
    T_device_cpf, _ = aria.T_device_cpf_from_calibration(calibration)
    # A device pose is not a CPF pose: 7 cm and 97 degrees apart (feeding one for the other is the trap).
    assert T_device_cpf[:3, 3].norm() > 0.06 and T_device_cpf[0, 0] < 0.5
    T_world_cpf = clip["T_world_cpf"][0].to(torch.float64)
    head_xy = T_world_cpf[:, :2, 3]
    folder = write_mps_folder(tmp_path / "mps", T_world_cpf, T_device_cpf, points_world=floor_points_world(head_xy))

    tto = TTOConfig(num_iterations=5)
    cfg = recipe.Config(mps_dir=folder, output_dir=tmp_path / "out", calibration=calibration, seed=0, use_tto=True,
                        tto=tto, render=True, render_max_frames=8, gif_frame_step=4,
                        stitch=StitchConfig(T, 16), task=task.cfg)
    summary = recipe.run_inference(cfg)
    out = np.load(tmp_path / "out" / "joints.npz")

    # The head trajectory is the clip's, up to the MPS world's yaw and horizontal shift (kept), floor at 0.
    assert summary["recording"]["floor"]["method"] == "semidense_points"
    assert abs(summary["recording"]["floor"]["floor_z_m"] - FLOOR_Z_MPS) < 0.01
    assert summary["recording"]["gravity_tilt_deg"] < 1e-6
    T_mps_world = T_mps_world_example()
    T_world_out = make_transform(T_mps_world[:3, :3], T_mps_world[:3, 3] * torch.tensor([1.0, 1.0, 0.0]))
    T_out_cpf = torch.from_numpy(out["T_world_cpf"]).to(torch.float64)  # (148, 4, 4) motion frames
    assert T_out_cpf.shape == (148, 4, 4)
    expected = T_world_out @ T_world_cpf[1:]
    assert torch.allclose(T_out_cpf[:, :3, :3], expected[:, :3, :3], atol=1e-4)
    assert torch.allclose(T_out_cpf[:, :3, 3], expected[:, :3, 3], atol=0.01)  # floor estimate error only

    # MPJPE of the recipe's body against the clip vs the evaluation recipe's functions (sample_clip, refine_decoded,
    # task.evaluate, as in eval_ego_motion.evaluate_clips) on the same clip, seed, noise stream and settings.
    T_clip_out = invert_transform(T_world_out)
    mpjpe_infer = {}
    for variant, key in (("base", "joints_world_before_tto"), ("tto", "joints_world")):
        joints_clip = apply_transform(T_clip_out, torch.from_numpy(out[key]).double())  # back in the clip's world
        mpjpe_infer[variant] = float(mpjpe(joints_clip[None].float(), clip["joints_world"]))
    batch, sample = sample_clip(task, load_denoiser(DEMO_PRIOR_PATH).eval(), CLIP, stitch_cfg=StitchConfig(T, 16),
                                generator=make_generator(0, recipe.NOISE_STREAM))
    decoded = {"base": sample.decoded, "tto": refine_decoded(task, sample.decoded, batch["T_world_cpf"], tto)}
    for variant, dec in decoded.items():
        mpjpe_eval = float(task.evaluate(dec, batch)["mpjpe_mm"][0])
        print(f"MPJPE {variant}: inference recipe {mpjpe_infer[variant]:.2f} mm, evaluation {mpjpe_eval:.2f} mm")
        assert abs(mpjpe_infer[variant] - mpjpe_eval) <= 0.1 * mpjpe_eval, variant

    # The AMASS file reads back through the data loader to the same joints.
    sequence = load_sequence(tmp_path / "out" / "motion_amass.npz", body, WindowConfig(window_frames=1))
    assert torch.allclose(sequence.joints_world, torch.from_numpy(out["joints_world"]), atol=1e-3)
    for name in ("motion.gif", "motion.png", "summary.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert summary["windows"]["starts"] == [0, 48, 84]


# ---------------------------------------------------------------------------------------------
# Gravity: a world that is not Z-up is detected and turned upright


def tilted_world(axis: tuple[float, float, float], angle_deg: float) -> torch.Tensor:
    """T_mps_world_example() with the whole MPS world rotated by ``angle_deg`` about ``axis``."""
    axis_t = torch.tensor(axis, dtype=torch.float64)
    R_tilt = axis_angle_to_matrix(axis_t / axis_t.norm() * math.radians(angle_deg))
    return make_transform(R_tilt, torch.zeros(3, dtype=torch.float64)) @ T_mps_world_example()


@needs_aria
@pytest.mark.parametrize(("axis", "angle_deg"), [((1.0, 0.3, 0.0), 30.0), ((0.0, 1.0, 0.0), 180.0)])
def test_a_world_rotated_away_from_z_up_is_detected_and_turned_upright(tmp_path, clip, body, axis, angle_deg):
    T_world_cpf = clip["T_world_cpf"][0].to(torch.float64)
    T_device_cpf, _ = aria.T_device_cpf_from_calibration()
    points = floor_points_world(T_world_cpf[:, :2, 3])
    folder = write_mps_folder(tmp_path / "mps", T_world_cpf, T_device_cpf, T_mps_world=tilted_world(axis, angle_deg),
                              points_world=points)
    recording = aria.load_recording(folder, body)

    # detection: the tilt is measured from the gravity columns
    assert recording.gravity.tilt_deg == pytest.approx(angle_deg, abs=1e-3)
    assert recording.gravity.spread_deg < 1e-6
    # result: the same head trajectory as in the clip's upright world, up to a turn about +Z and a
    # horizontal shift, which the prior cannot see (the condition is yaw- and position-invariant) ...
    ours, truth = recording.T_world_cpf, T_world_cpf
    R_delta = ours[:, :3, :3] @ truth[:, :3, :3].transpose(-1, -2)  # (N, 3, 3): one yaw for every frame
    assert torch.allclose(R_delta[:, 2, 2], torch.ones(len(R_delta), dtype=torch.float64), atol=1e-6)
    assert torch.allclose(R_delta, R_delta[:1].expand_as(R_delta), atol=1e-6)
    # ... heights above the floor included (the floor is found after turning the world upright)
    assert torch.allclose(ours[:, 2, 3], truth[:, 2, 3], atol=0.01)
    assert torch.allclose(raw_head_features(ours), raw_head_features(truth), atol=0.01)
    # the transform kept for overlays maps the MPS world's gravity to -Z
    g_mps = tilted_world(axis, angle_deg)[:3, :3] @ torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64)
    assert torch.allclose(recording.T_world_mps[:3, :3] @ g_mps, torch.tensor([0.0, 0.0, -1.0], dtype=torch.float64),
                          atol=1e-9)


def test_gravity_that_gives_no_single_direction_is_refused():
    down = torch.tensor([0.0, 0.0, -9.81], dtype=torch.float64).expand(10, 3)
    with pytest.raises(ValueError, match=r"do not give a direction .* cannot be turned Z-up"):
        aria.gravity_alignment(torch.zeros(10, 3, dtype=torch.float64))
    tilted = axis_angle_to_matrix(torch.tensor([math.radians(5.0), 0.0, 0.0], dtype=torch.float64)) @ down[0]
    mixed = torch.cat([down[:5], tilted.expand(5, 3)])
    with pytest.raises(ValueError, match=r"differ by up to 2\.\d\d degrees .* not in one world"):
        aria.gravity_alignment(mixed, max_spread_deg=1.0)
    assert aria.gravity_alignment(down).tilt_deg == 0.0


# ---------------------------------------------------------------------------------------------
# Bad files fail with messages that say what is wrong


@pytest.fixture
def short_recording(tmp_path, clip) -> Path:
    """80 head poses of the clip (more than one 64-frame window) as an MPS folder without points."""
    T_device_cpf, _ = aria.T_device_cpf_from_calibration()
    return write_mps_folder(tmp_path / "mps", clip["T_world_cpf"][0, :80].double(), T_device_cpf)


@needs_aria
def test_missing_columns_are_named(short_recording):
    path = short_recording / aria.CLOSED_LOOP_FILE

    def drop(header, rows):
        i = header.index("qw_world_device")
        del header[i]
        for row in rows:
            del row[i]

    rewrite_rows(path, drop)
    with pytest.raises(ValueError, match=r"lacks the column\(s\) \['qw_world_device'\]"):
        aria.read_closed_loop_trajectory(path)


@needs_aria
@pytest.mark.parametrize(("value", "message"), [
    ("nan", r"stopped after 5 of 80 rows; data row 5 \(file line 7\) has values that are NaN or not numbers: "
            r"\{'qx_world_device': 'nan', 'qy_world_device': 'nan'"),
    ("0", r"NaN or zero quaternion \(qx_world_device, qy_world_device, qz_world_device, qw_world_device\) in data "
          r"row\(s\) \[5\] \(file line 7 first\)"),
])
def test_nan_or_zero_quaternions_are_refused(short_recording, value, message):
    path = short_recording / aria.CLOSED_LOOP_FILE

    def corrupt(header, rows):
        for column in aria.QUATERNION_COLUMNS:
            rows[5][header.index(column)] = value

    rewrite_rows(path, corrupt)
    with pytest.raises(ValueError, match=message):
        aria.read_closed_loop_trajectory(path)


@needs_aria
def test_timestamps_out_of_order_are_refused(short_recording):
    path = short_recording / aria.CLOSED_LOOP_FILE

    def swap(header, rows):
        i = header.index("tracking_timestamp_us")
        rows[10][i], rows[11][i] = rows[11][i], rows[10][i]

    rewrite_rows(path, swap)
    with pytest.raises(ValueError, match=r"tracking_timestamp_us is not strictly increasing: data row 11 \(\d+ us\) "
                                         r"follows row 10"):
        aria.read_closed_loop_trajectory(path)


@needs_aria
def test_a_recording_shorter_than_one_window_is_refused_by_the_recipe(tmp_path, clip, task):
    recipe = infer_ego_motion_recipe
    folder = write_mps_folder(tmp_path / "mps", clip["T_world_cpf"][0, :40].double(),
                              aria.T_device_cpf_from_calibration()[0])
    cfg = recipe.Config(mps_dir=folder, output_dir=tmp_path / "out", render=False, task=task.cfg,
                        stitch=StitchConfig(T, 16))
    with pytest.raises(ValueError, match=r"gives 40 head poses at 30 fps \(1\.30 s\), shorter than one window of the "
                                         r"prior: 65 poses \(2\.13 s\)"):
        recipe.run_inference(cfg)
    assert not (tmp_path / "out").exists()  # refused before any sampling or writing


@needs_aria
def test_several_slam_maps_need_a_choice(short_recording):
    path = short_recording / aria.CLOSED_LOOP_FILE
    rewrite_rows(path, lambda header, rows: [row.__setitem__(0, "g1") for row in rows[40:]])
    with pytest.raises(ValueError, match=r"holds 2 SLAM maps \(\{'g0': 40, 'g1': 40\} poses each\).*--aria.graph-uid"):
        aria.read_closed_loop_trajectory(path)
    assert len(aria.read_closed_loop_trajectory(path, graph_uid="g1").timestamps_us) == 40


def test_a_missing_projectaria_tools_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "projectaria_tools", None)
    (tmp_path / aria.CLOSED_LOOP_FILE).write_text(",".join(aria.CLOSED_LOOP_COLUMNS) + "\n")
    with pytest.raises(ImportError, match=r"needs projectaria-tools, which is not installed: "
                                          r"pip install -e '\.\[aria\]'"):
        aria.read_closed_loop_trajectory(tmp_path / aria.CLOSED_LOOP_FILE)


# ---------------------------------------------------------------------------------------------
# Device -> CPF, resampling, floor


@needs_aria
def test_the_default_cpf_is_aria_gen1_cad_and_a_calibration_file_replaces_it(tmp_path):
    default, source = aria.T_device_cpf_from_calibration()
    assert "CAD value of an Aria Gen1 DVT-S" in source
    large, _ = aria.T_device_cpf_from_calibration(calibration_json(tmp_path / "c.json", "DVT-L"))
    assert torch.allclose(default[:3, :3], large[:3, :3], atol=1e-6)  # same design rotation ...
    assert 1e-3 < float((default[:3, 3] - large[:3, 3]).norm()) < 5e-3  # ... frames 2.3 mm apart
    R = default[:3, :3]
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-6) and float(torch.det(R)) > 0
    # The CPF is not the device frame: 7 cm away from it and turned by 97 degrees.
    assert 0.06 < float(default[:3, 3].norm()) < 0.08
    assert math.degrees(float(matrix_to_axis_angle(R).norm())) == pytest.approx(96.9, abs=0.1)
    (tmp_path / "calibration.yaml").write_text("")
    with pytest.raises(ValueError, match="expected a device calibration .json or a recording .vrs"):
        aria.T_device_cpf_from_calibration(tmp_path / "calibration.yaml")


def test_resampling_a_1khz_trajectory_gives_the_30fps_poses_and_refuses_gaps(clip):
    T_30 = clip["T_world_cpf"][0, :31].double()  # 1 s at 30 fps
    t_30 = torch.round(torch.arange(31, dtype=torch.float64) * 1e6 / 30).long()
    t_1k = torch.arange(0, 1_000_001, 1000)  # 1 kHz over the same second
    _, T_1k = aria.resample_poses(t_30, T_30, 1000.0, max_gap_s=0.1)  # up-sample (interpolation)
    assert T_1k.shape == (1001, 4, 4)
    t_out, T_back = aria.resample_poses(t_1k, T_1k, 30.0, max_gap_s=0.1)
    assert T_back.shape == (31, 4, 4) and torch.allclose(t_out, t_30.double(), atol=0.5)
    assert torch.allclose(T_back, T_30, atol=1e-3)
    with pytest.raises(ValueError, match=r"a 0\.201 s gap .* --aria.max-gap-s 0.1"):
        aria.resample_poses(torch.cat([t_1k[:300], t_1k[500:]]), torch.cat([T_1k[:300], T_1k[500:]]), 30.0, 0.1)


def test_floor_is_the_lowest_supported_band_not_the_lowest_or_the_densest_one(body):
    g = torch.Generator().manual_seed(1)
    floor = -1.3 + 0.004 * torch.randn(800, generator=g, dtype=torch.float64)
    table = -0.55 + 0.004 * torch.randn(3000, generator=g, dtype=torch.float64)  # denser than the floor
    stray = -2.5 + 1.1 * torch.rand(20, generator=g, dtype=torch.float64)  # below the floor
    ceiling = 1.1 + 0.004 * torch.randn(500, generator=g, dtype=torch.float64)
    heights = torch.cat([floor, table, stray, ceiling])[torch.randperm(4320, generator=g)]
    head_z = torch.full((100,), 0.3, dtype=torch.float64)  # eyes 1.6 m above the floor
    estimate = aria.estimate_floor_height(heights, head_z, aria.AriaConfig())
    assert estimate.method == "semidense_points" and abs(estimate.floor_z_m - (-1.3)) < 0.003
    assert 700 < estimate.num_inliers <= 820
    with pytest.raises(ValueError, match="the floor was not mapped.*--aria.no-use-semidense-floor"):
        aria.estimate_floor_height(stray, head_z, aria.AriaConfig())
    # without points: the median head height minus the body model's standing eye height (1.59 m here)
    assert aria.standing_cpf_height_m(body) == pytest.approx(1.5912, abs=1e-3)
    fallback = aria.floor_from_head_height(head_z, aria.standing_cpf_height_m(body))
    assert fallback.method == "head_height" and fallback.floor_z_m == pytest.approx(0.3 - 1.5912, abs=1e-3)


@needs_aria
def test_without_semidense_points_the_floor_comes_from_the_head_height(short_recording, body, clip):
    recording = aria.load_recording(short_recording, body)  # no semidense_points.csv.gz in the folder
    assert recording.floor.method == "head_height"
    # the clip's wearer has a median eye height of 1.58 m, the mean shape 1.59 m: floor within 2 cm
    assert torch.allclose(recording.T_world_cpf[:, 2, 3], clip["T_world_cpf"][0, :80, 2, 3].double(), atol=0.02)


# ---------------------------------------------------------------------------------------------
# Stitching: overlapping windows give one continuous motion


def test_stitched_windows_agree_on_their_overlaps_and_leave_no_seam(task, clip):
    model = load_denoiser(DEMO_PRIOR_PATH).eval()
    head = clip["T_world_cpf"]  # 148 motion frames: not a multiple of the 48-frame stride
    sample = sample_sequence(task, model, head, generator=make_generator(0, "stitch"), stitch_cfg=StitchConfig(T, 16))
    starts = sample.layout.starts
    assert starts == (0, 48, 84) and sample.x0.shape == (1, 148, 226)
    windows = sample.trajectory.samples  # (3, 64, 226)
    for k, s in enumerate(starts):  # every window lands on the stitched motion over all of its frames
        assert torch.allclose(windows[k], sample.x0[0, s : s + T], atol=1e-5), k

    def frame_steps(joints: torch.Tensor) -> torch.Tensor:  # (1, L, 22, 3) -> (L-1,) mean joint travel, m
        return (joints[0, 1:] - joints[0, :-1]).norm(dim=-1).mean(dim=-1)

    seams = [s - 1 for s in starts[1:]] + [s + T - 1 for s in starts[:-1]]  # steps where a window starts or ends
    inner = torch.ones(147, dtype=torch.bool)
    inner[seams] = False
    steps = frame_steps(sample.decoded["joints_world"])
    assert steps[seams].max() <= steps[inner].max()
    # The check can fail: windows sampled independently and cut at the window starts leave a jump.
    apart = sample_sequence(task, model, head, generator=make_generator(0, "stitch"),
                            stitch_cfg=StitchConfig(T, 16, use_merge_every_step=False)).trajectory.samples
    cut = torch.cat([apart[0, :48], apart[1, :36], apart[2]])[None]
    cut_steps = frame_steps(task.decode(cut, {"T_world_cpf": head})["joints_world"])
    assert cut_steps[[47, 83]].max() > cut_steps[inner].max()
