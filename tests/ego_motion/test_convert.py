"""BVH parsing, retargeting, resampling, the AMASS reader/writer and the shipped converted clips."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.ego_motion.body.body_model import (
    load_body_model,
    mirror_joint_positions,
    mirror_local_rotations,
    mirror_root_pose,
)
from tasks.ego_motion.body.geometry import axis_angle_to_matrix, geodesic_angle, rotation_about_z
from tasks.ego_motion.data.amass import AmassSequence, load_amass_npz, save_amass_npz
from tasks.ego_motion.data.bvh import BvhMotion, global_poses, parse_bvh, positions_relative_to_offsets
from tasks.ego_motion.data.convert import (
    ASSETS,
    DEFAULT_MOCAP_ROOT,
    TEST_CLIPS,
    RetargetedMotion,
    convert_bvh,
    convert_reactidle,
    detect_variant,
    fit_betas,
    main,
    reference_pose,
    resample_motion,
    retarget,
    segment_lengths,
    to_amass,
    toe_clearance_m,
)
from tasks.ego_motion.data.sequences import WindowConfig, load_sequence

needs_mocap = pytest.mark.skipif(
    not (DEFAULT_MOCAP_ROOT / "cmu_iclone").exists(), reason="needs ../shared/mocap"
)
CMU = ASSETS / "cmu"
TEST_DATA = Path(__file__).resolve().parents[1] / "data"  # committed; holds reactidle/ like the mocap folder
REACTIDLE_EXCERPT = TEST_DATA / "reactidle" / "acted" / "012_acted_excerpt.bvh"  # 48 frames, 24 fps


@pytest.fixture(scope="module")
def body():
    return load_body_model(dtype=torch.float64)


def _fk(body, seq: AmassSequence):
    R = axis_angle_to_matrix(torch.as_tensor(seq.poses, dtype=torch.float64).reshape(-1, 52, 3))
    betas = torch.as_tensor(seq.betas, dtype=torch.float64)
    T = body.T_world_root_from_amass(R[:, 0], torch.as_tensor(seq.trans, dtype=torch.float64), betas)
    return R, betas, T, body.forward_kinematics(R[:, 1:], betas=betas, T_world_root=T)


@needs_mocap
def test_parse_real_clips():
    m = parse_bvh(DEFAULT_MOCAP_ROOT / "cmu_iclone/001/001_01.bvh")
    assert m.num_frames == 1376 and m.frame_time_s == pytest.approx(0.016667)
    assert m.skeleton.names[0] == "CC_Base_Hip" and m.values.shape == (
        1376,
        sum(map(len, m.skeleton.channels)),
    )
    o = parse_bvh(DEFAULT_MOCAP_ROOT / "cmu_original/01_01.bvh")
    assert o.num_frames == 2752 and o.fps == pytest.approx(120.0, rel=1e-4)
    assert detect_variant(m.skeleton).name == "cc_iclone" and detect_variant(o.skeleton).name == "cmu_mb"
    assert (
        detect_variant(parse_bvh(DEFAULT_MOCAP_ROOT / "cmu_original/131_01.bvh").skeleton).name == "cmu_max"
    )
    # Bone lengths are constant over frames (rigid FK); the 01_01 frame 0 T-pose has level arms.
    g = global_poses(o, slice(0, 50))
    sk = o.skeleton
    upper = np.linalg.norm(
        g.t_world_joint[:, sk.index("LeftForeArm")] - g.t_world_joint[:, sk.index("LeftArm")], axis=-1
    )
    assert np.ptp(upper) < 1e-9
    arm = g.t_world_joint[0, sk.index("LeftHand")] - g.t_world_joint[0, sk.index("LeftArm")]
    assert abs(arm[1]) < 0.1 * np.linalg.norm(arm)


def test_parse_rejects_malformed(tmp_path):
    text = (
        "HIERARCHY\nROOT Hips\n{\n OFFSET 0 0 0\n"
        " CHANNELS 6 Xposition Yposition Zposition Zrotation Yrotation Xrotation\n"
    )
    path = tmp_path / "bad.bvh"
    path.write_text(text + "}\nMOTION\nFrames: 2\nFrame Time: 0.1\n0 0 0 0 0 0\n")
    with pytest.raises(ValueError, match="2 frames"):
        parse_bvh(path)
    path.write_text(text + "}\nMOTION\nFrames: 1\nFrame Time: 0.1\n0 0 0 0 0\n")
    with pytest.raises(ValueError, match="declares 6"):
        parse_bvh(path)


def test_euler_order_is_intrinsic_as_listed(tmp_path):
    path = tmp_path / "one.bvh"
    path.write_text(
        "HIERARCHY\nROOT A\n{\n OFFSET 0 0 0\n CHANNELS 3 Zrotation Xrotation Yrotation\n"
        " End Site\n {\n  OFFSET 0 1 0\n }\n}\nMOTION\nFrames: 1\nFrame Time: 0.5\n90 90 0\n"
    )
    g = global_poses(parse_bvh(path))
    # Rz(90) @ Rx(90) applied to the +Y end site: Rx takes +Y to +Z, Rz leaves +Z.
    np.testing.assert_allclose(g.t_world_joint[0, 1], [0.0, 0.0, 1.0], atol=1e-12)


@needs_mocap
def test_cc_tpose_retargets_to_near_zero_rotations(body):
    m = parse_bvh(DEFAULT_MOCAP_ROOT / "cmu_iclone/007/007_03.bvh")  # frame 0 is the rig's T-pose
    variant = detect_variant(m.skeleton)
    ref = reference_pose(m, variant)
    betas = fit_betas(body, {k: float(v) for k, v in segment_lengths(ref.t_bvh_joint_m).items()})
    r = retarget(m, variant, ref, body, betas, frames=slice(0, 1))
    eye = torch.eye(3, dtype=torch.float64)
    angles = np.rad2deg(geodesic_angle(torch.as_tensor(r.body_rotmats[0]), eye).numpy())
    assert angles[:19].max() < 1.0  # everything but the wrists (hand direction differs by ~8 deg)
    assert angles[19:].max() < 10.0
    # Root: the upright +Y-up body becomes +Z-up.
    np.testing.assert_allclose(r.R_world_root[0] @ [0, 1, 0], [0, 0, 1], atol=0.02)


def test_resample_decimates_and_slerps():
    g = torch.Generator().manual_seed(0)
    F = 61
    yaw = torch.linspace(0, 1.5, F, dtype=torch.float64)
    R_root = rotation_about_z(yaw).numpy()
    body = axis_angle_to_matrix(torch.randn(F, 21, 3, generator=g, dtype=torch.float64) * 0.3).numpy()
    t = np.cumsum(np.ones((F, 3)) * 0.01, 0)
    m = RetargetedMotion(R_world_root=R_root, t_world_root_m=t, body_rotmats=body, fps=60.0)
    half = resample_motion(m, 30.0)
    assert half.body_rotmats.shape[0] == 31 and half.fps == 30.0
    np.testing.assert_allclose(half.body_rotmats, body[::2], atol=1e-10)
    np.testing.assert_allclose(half.t_world_root_m, t[::2], atol=1e-12)
    # 60 -> 40 fps: frame 1 sits at t = 1/40 s, between source frames 1 and 2 (weight 0.5).
    r40 = resample_motion(m, 40.0)
    expected_yaw = 0.5 * (yaw[1] + yaw[2])
    np.testing.assert_allclose(r40.R_world_root[1], rotation_about_z(expected_yaw).numpy(), atol=1e-10)


def _write_seq(path, **over):
    n = over.pop("n", 10)
    arrays = dict(
        poses=np.zeros((n, 156)),
        trans=np.zeros((n, 3)),
        betas=np.zeros(16),
        gender=np.array("neutral"),
        mocap_framerate=np.array(30.0),
    )
    arrays.update(over)
    np.savez(path, **arrays)
    return path


def test_amass_reader_validates(tmp_path):
    seq = load_amass_npz(_write_seq(tmp_path / "ok.npz"), expected_framerate=30.0)
    assert seq.num_frames == 10 and seq.body_pose.shape == (10, 63) and seq.hand_pose.shape == (10, 90)
    bad = tmp_path / "keys.npz"
    np.savez(bad, poses=np.zeros((10, 156)))
    with pytest.raises(KeyError, match="trans"):
        load_amass_npz(bad)
    poses = np.zeros((10, 156))
    poses[4, 7] = np.nan
    with pytest.raises(ValueError, match=r"NaN.*\[4\]"):
        load_amass_npz(_write_seq(tmp_path / "nan.npz", poses=poses))
    with pytest.raises(ValueError, match="at least"):
        load_amass_npz(
            _write_seq(tmp_path / "short.npz", n=1, poses=np.zeros((1, 156)), trans=np.zeros((1, 3)))
        )
    with pytest.raises(ValueError, match="resample"):
        load_amass_npz(
            _write_seq(tmp_path / "fps.npz", mocap_framerate=np.array(120.0)), expected_framerate=30.0
        )
    with pytest.raises(ValueError, match="156"):
        load_amass_npz(_write_seq(tmp_path / "dim.npz", poses=np.zeros((10, 72))))
    out = tmp_path / "roundtrip.npz"
    save_amass_npz(out, seq)
    again = load_amass_npz(out)
    assert again.gender == "neutral" and again.mocap_framerate == 30.0
    np.testing.assert_array_equal(again.poses, seq.poses)


def test_shipped_clips_and_split():
    split = json.loads((ASSETS / "split.json").read_text())
    clips = sorted(p.stem for p in CMU.glob("*.npz"))
    assert len(clips) == 65 and (CMU / "NOTICE.md").exists()
    assert sorted(split["train"] + split["test"]) == clips and not set(split["train"]) & set(split["test"])
    assert sorted(split["test"]) == sorted(TEST_CLIPS)
    subjects = {c[:3] for c in clips}
    assert subjects == {c[:3] for c in split["test"]} | {c[:3] for c in split["train"]}
    assert subjects <= {c[:3] for c in split["test"]}  # every subject has held-out clips
    assert ("001_01" in split["train"]) == ("001_01_orig" in split["train"])  # same trial, one side
    for c in clips:
        seq = load_amass_npz(CMU / f"{c}.npz", expected_framerate=30.0)
        assert seq.poses.dtype == np.float32 and seq.betas.shape == (16,) and seq.num_frames >= 30
        assert np.all(seq.hand_pose == 0)


@pytest.mark.parametrize("clip", ["007_03", "002_01", "131_01_orig", "001_01_orig"])
def test_converted_motion_is_plausible(body, clip):
    seq = load_amass_npz(CMU / f"{clip}.npz")
    R, betas, T, fk = _fk(body, seq)
    T_world_cpf = body.T_world_cpf_from_root(T, R[:, 1:], betas)
    cpf_z = T_world_cpf[:, 2, 3]
    assert 1.3 < float(cpf_z.median()) < 1.8
    # Smooth head: speeds below 4 m/s and accelerations below 40 m/s^2 at 30 fps.
    vel = (T_world_cpf[1:, :3, 3] - T_world_cpf[:-1, :3, 3]) * 30.0
    assert float(vel.norm(dim=-1).max()) < 4.0
    assert float(((vel[1:] - vel[:-1]) * 30.0).norm(dim=-1).max()) < 40.0
    # Floor: toes rest at the model's clearance (the 1st percentile by construction), and spend
    # a good part of the clip within 3 cm of it (contacts).
    toe_z = fk.t_world_joint[:, [10, 11], 2].min(-1).values.numpy()
    clearance = toe_clearance_m(body, seq.betas)
    assert abs(np.percentile(toe_z, 1.0) - clearance) < 1e-3
    assert np.mean(toe_z < clearance + 0.03) > 0.2
    # Mirrored motion: FK of the mirrored rotations/root equals the mirrored joints.
    fk_m = body.forward_kinematics(
        mirror_local_rotations(R[:, 1:]), betas=betas, T_world_root=mirror_root_pose(T)
    )
    assert torch.allclose(fk_m.t_world_joint, mirror_joint_positions(fk.t_world_joint), atol=1e-6)


def test_smplx_forward_on_converted_clip_matches_fast_fk(body):
    seq = load_amass_npz(CMU / "005_05.npz")
    R, betas, T, fk = _fk(body, seq)
    n = seq.num_frames
    p = torch.as_tensor(seq.poses, dtype=torch.float64)
    out = body.smplx_layer(
        betas=betas.expand(n, -1),
        global_orient=p[:, :3],
        body_pose=p[:, 3:66],
        left_hand_pose=p[:, 66:111],
        right_hand_pose=p[:, 111:],
        transl=torch.as_tensor(seq.trans, dtype=torch.float64),
    )
    assert torch.allclose(out.joints[:, :52], fk.t_world_joint, atol=1e-5)


@needs_mocap
def test_amass_trans_reproduces_retargeted_pelvis(body):
    """smplx's pelvis from the written (poses, trans) is the retargeted pelvis, lowered to the floor."""
    m = parse_bvh(DEFAULT_MOCAP_ROOT / "cmu_iclone/002/002_03.bvh")
    variant = detect_variant(m.skeleton)
    ref = reference_pose(m, variant)
    betas = fit_betas(body, {k: float(v) for k, v in segment_lengths(ref.t_bvh_joint_m).items()})
    r = resample_motion(retarget(m, variant, ref, body, betas))
    seq = to_amass(r, body, betas)
    n = seq.num_frames
    p = torch.as_tensor(seq.poses, dtype=torch.float64)
    out = body.smplx_layer(
        betas=torch.as_tensor(seq.betas, dtype=torch.float64).expand(n, -1),
        global_orient=p[:, :3],
        body_pose=p[:, 3:66],
        left_hand_pose=p[:, 66:111],
        right_hand_pose=p[:, 111:],
        transl=torch.as_tensor(seq.trans, dtype=torch.float64),
    )
    pelvis = out.joints[:, 0].numpy()
    shift = r.t_world_root_m - pelvis  # constant: the floor offset, along z only
    np.testing.assert_allclose(shift - shift[0], 0.0, atol=1e-5)
    np.testing.assert_allclose(shift[0, :2], 0.0, atol=1e-5)


# ---------------------------------------------------------------- ReActIdle (committed excerpt only)
@pytest.fixture(scope="module")
def reactidle(body):
    """The excerpt converted, with its FK: (AmassSequence, local rotations (N, 51, 3, 3), FK joints)."""
    seq = convert_bvh(REACTIDLE_EXCERPT, body)
    R, _, _, fk = _fk(body, seq)
    return seq, R[:, 1:], fk


def test_reactidle_rig_is_detected_and_its_child_positions_are_whole_translations():
    m = parse_bvh(REACTIDLE_EXCERPT)
    assert m.num_frames == 48 and m.fps == pytest.approx(24.0, rel=1e-4) and len(m.skeleton.channels[0]) == 6
    assert detect_variant(m.skeleton).name == "reactidle"
    sk = m.skeleton
    # Read as whole local translations, the thigh heads sit exactly at the hip bones' end sites (the
    # pelvis roll that pelvis.L carries); added to OFFSET, the hip width would double.
    fixed = global_poses(positions_relative_to_offsets(m, max_deviation=0.05)).t_world_joint
    for side in "LR":
        thigh, hip_end = sk.index(f"thigh.{side}"), sk.index(f"pelvis.{side}_End")
        np.testing.assert_allclose(fixed[:, thigh], fixed[:, hip_end], atol=1e-5)  # files keep 6 decimals
    raw = global_poses(m).t_world_joint
    hip_width = lambda t: np.linalg.norm(t[:, sk.index("thigh.L")] - t[:, sk.index("thigh.R")], axis=-1)
    np.testing.assert_allclose(hip_width(raw), 2 * hip_width(fixed), rtol=0.15)
    # A file whose child position channels are offsets from OFFSET (here all zero) is refused.
    zeros = BvhMotion(sk, m.frame_time_s, np.zeros_like(m.values))
    with pytest.raises(ValueError, match="not whole local translations"):
        positions_relative_to_offsets(zeros, max_deviation=0.05)


def test_reactidle_retarget_stands_on_the_floor_upright_and_smoothly(body, reactidle):
    seq, local, fk = reactidle
    assert seq.mocap_framerate == 30.0 and seq.num_frames == 58  # 47 frames after frame 0, 24 -> 30 fps
    J = fk.t_world_joint.numpy()
    # Feet at the floor: the lowest toe joint sits at the model's toe clearance above z = 0.
    toe_z = J[:, [10, 11], 2].min(-1)
    clearance = toe_clearance_m(body, seq.betas)
    assert abs(np.percentile(toe_z, 1.0) - clearance) < 1e-3 and abs(toe_z.min() - clearance) < 0.01
    assert J[:, [7, 8], 2].min() > clearance  # ankles above the toes
    # Plausible standing adult: head joint and headset (eyes) 1.4-1.9 m up (this performer: 1.45 / 1.51 m).
    cpf_z = body.T_world_cpf_from_root(fk.T_world_joint[:, 0], local, torch.as_tensor(seq.betas).double())[:, 2, 3]
    assert 1.4 < float(np.median(J[:, 15, 2])) < 1.9 and 1.4 < float(cpf_z.median()) < 1.9
    # Upright: pelvis -> head points up (+Z) in every frame.
    up = J[:, 15] - J[:, 0]
    assert (up[:, 2] / np.linalg.norm(up, axis=-1)).min() > 0.97
    # No bone flips: every global joint rotation turns by less than 10 deg between frames (30 fps).
    R = fk.R_world_joint[:, :22]
    assert float(torch.rad2deg(geodesic_angle(R[1:], R[:-1])).max()) < 10.0
    # Joints the rig lacks (spine2, toes, wrists) keep an identity local rotation.
    eye = torch.eye(3, dtype=torch.float64)
    missing = [6 - 1, 10 - 1, 11 - 1, 20 - 1, 21 - 1]  # SMPL-H joints 6, 10, 11, 20, 21 (local index = j - 1)
    assert float(geodesic_angle(local[:, missing], eye).max()) < 1e-5
    assert np.all(seq.hand_pose == 0)


def test_reactidle_cli_writes_loadable_clips_licence_and_notice(tmp_path):
    out = tmp_path / "reactidle_amass"
    main(["--reactidle", "--mocap-root", str(TEST_DATA), "--output-dir", str(out)])
    assert sorted(p.name for p in out.iterdir()) == ["012_acted_excerpt.npz", "LICENSE.txt", "NOTICE.md"]
    assert (out / "LICENSE.txt").read_bytes() == (TEST_DATA / "reactidle" / "LICENSE.txt").read_bytes()
    notice = (out / "NOTICE.md").read_text()
    assert "Atxa Landa" in notice and "2509.05023" in notice and "MIT" in notice
    seq = load_sequence(out / "012_acted_excerpt.npz", load_body_model(), WindowConfig(window_frames=32))
    assert seq.num_frames == 58 and seq.body_rotmats.shape == (58, 21, 3, 3)
    assert abs(float(seq.joints_world[:, [7, 8, 10, 11], 2].min())) < 0.05  # on the floor, no re-flooring
    with pytest.raises(FileNotFoundError, match="--mocap-root"):
        convert_reactidle(tmp_path / "nowhere", out, load_body_model(dtype=torch.float64))
