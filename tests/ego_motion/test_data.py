"""Tests of the AMASS-layout loader: window counts and T+1/T alignment, headset = FK head joint
@ T_head_cpf, hand-made contacts, mirroring, resampling to 30 fps, skipping bad files, splits
and the content-fingerprinted cache.

A tiny left/right-symmetric SMPL-H stand-in (one vertex per joint) is written to a temp dir, so
the tests need neither the licensed model nor the converted CMU clips, and mirroring is exact.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

import tasks.ego_motion.pretrain as pretrain_job
from tasks.ego_motion.body.body_model import load_body_model, mirror_joint_positions
from tasks.ego_motion.body.geometry import (
    FOOT_JOINTS,
    SMPLH_MIRROR_PERMUTATION,
    SMPLH_PARENTS,
    axis_angle_to_matrix,
    geodesic_angle,
)
from tasks.ego_motion.data import windows as data
from tasks.ego_motion.data.sequences import ContactThresholds, WindowConfig, compute_contacts, resample_to_fps
from tasks.ego_motion.data.splits import DataSource
from tasks.ego_motion.data.windows import load_windows, window_starts

T = 16  # window frames in these tests
# Rest joints of the stand-in, model frame (+Y up, left on +X); pelvis 0.95 m, ankles 0.09 m, toes 0.03 m.
_REST_BODY = {
    0: (0, 0.95, 0), 1: (0.09, 0.87, 0), 2: (-0.09, 0.87, 0), 3: (0, 1.05, 0), 4: (0.10, 0.50, 0),
    5: (-0.10, 0.50, 0), 6: (0, 1.18, 0), 7: (0.10, 0.09, 0), 8: (-0.10, 0.09, 0), 9: (0, 1.30, 0),
    10: (0.11, 0.03, 0.12), 11: (-0.11, 0.03, 0.12), 12: (0, 1.50, 0), 13: (0.07, 1.42, 0),
    14: (-0.07, 1.42, 0), 15: (0, 1.60, 0.02), 16: (0.18, 1.42, 0), 17: (-0.18, 1.42, 0),
    18: (0.45, 1.42, 0), 19: (-0.45, 1.42, 0), 20: (0.70, 1.42, 0), 21: (-0.70, 1.42, 0),
}  # fmt: skip
PELVIS_Y_M = 0.95
R_ZUP_FROM_YUP = np.array([math.pi / 2, 0.0, 0.0])  # root axis-angle: model +Y -> world +Z


def _write_body_model(path: Path) -> Path:
    J = np.zeros((52, 3))
    for j, p in _REST_BODY.items():
        J[j] = p
    for j in range(22, 52):  # fingers: 3 per chain, left hand 22..36 (+X), right 37..51 (-X)
        side, k = (1.0 if j < 37 else -1.0), (j - 22) % 15
        J[j] = J[SMPLH_PARENTS[j]] + np.array([side * 0.03, 0.0, 0.01 * (k // 3 - 2)])
    assert np.allclose(J[list(SMPLH_MIRROR_PERMUTATION)], J * [-1, 1, 1])  # symmetric rest skeleton
    shapedirs = np.zeros((52, 3, 16))
    shapedirs[:, :, 0] = 0.05 * J  # beta 0: uniform scale; beta 1: height only (both symmetric)
    shapedirs[:, 1, 1] = 0.03 * J[:, 1]
    kintree = np.stack([np.array([2**32 - 1, *SMPLH_PARENTS[1:]]), np.arange(52)]).astype(np.int64)
    np.savez(path, v_template=J, shapedirs=shapedirs, posedirs=np.zeros((52, 3, 459)), J_regressor=np.eye(52),
             weights=np.eye(52), kintree_table=kintree, f=np.array([[0, 1, 2]]),
             cpf_offset_head=np.array([0.0, 0.08, 0.09]))
    return path


def _write_amass(path: Path, body_aa: np.ndarray, trans: np.ndarray, *, fps: float = 30.0,
                 betas: np.ndarray | None = None, root_aa: np.ndarray | None = None,
                 drop: tuple[str, ...] = ()) -> Path:
    """body_aa (N, 51, 3) local axis-angle (body + hands), upright root; ``drop`` omits keys."""
    n = body_aa.shape[0]
    root = np.broadcast_to(R_ZUP_FROM_YUP if root_aa is None else root_aa, (n, 3))
    arrays = dict(poses=np.concatenate([root, body_aa.reshape(n, -1)], 1).astype(np.float32),
                  trans=trans.astype(np.float32), betas=np.zeros(16) if betas is None else betas,
                  gender=np.array("neutral"), mocap_framerate=np.array(fps))
    arrays = {k: v for k, v in arrays.items() if k not in drop}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)
    return path


def _standing_trans(n: int, x_m: np.ndarray | float = 0.0) -> np.ndarray:
    """AMASS trans that puts the pelvis at 0.95 m (pelvis = trans + J_0, J_0 = (0, 0.95, 0))."""
    trans = np.zeros((n, 3))
    trans[:, 0], trans[:, 1], trans[:, 2] = x_m, -PELVIS_Y_M, PELVIS_Y_M
    return trans


def _random_body(n: int, seed: int, scale: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(0, 0.02, (n, 51, 3)), 0).clip(-scale, scale) + rng.normal(0, 0.05, (1, 51, 3))


def _source(root: Path, train: list[str], test: list[str]) -> DataSource:
    (root / "split.json").write_text(json.dumps({"train": train, "test": test}))
    return DataSource(root=root, split_file=root / "split.json")


@pytest.fixture(scope="module")
def body_path(tmp_path_factory) -> Path:
    return _write_body_model(tmp_path_factory.mktemp("body") / "tiny_smplh.npz")


@pytest.fixture(scope="module")
def model(body_path):
    return load_body_model(body_path)


@pytest.fixture(scope="module")
def moving(tmp_path_factory, body_path):
    """One 100-frame 30 fps clip with random rotations, betas and x = 0.02 m * frame; windows built once."""
    root = tmp_path_factory.mktemp("moving")
    n = 100
    betas = np.random.default_rng(0).normal(0, 1, 16)
    _write_amass(root / "walk.npz", _random_body(n, 1), _standing_trans(n, 0.02 * np.arange(n)), betas=betas,
                 root_aa=R_ZUP_FROM_YUP + np.array([0.0, 0.1, 0.2]))
    source = _source(root, ["walk"], ["walk"])
    kw = dict(source=source, config=WindowConfig(window_frames=T), body_model_path=body_path,
              cache_dir=root / "cache")
    return {"train": load_windows("train", **kw), "test": load_windows("test", **kw), "n": n}


def test_window_counts(moving):
    n = moving["n"]
    assert window_starts(n, T, 8) == list(range(0, (n - T - 1) // 8 * 8 + 1, 8))
    assert window_starts(T + 1, T, 8) == [0] and window_starts(T, T, 8) == []
    train, test = moving["train"], moving["test"]
    assert len(train) == 2 * ((n - T - 1) // (T // 2) + 1)  # stride T/2, plus mirrored copies
    assert len(test) == (n - T - 1) // T + 1  # stride T, no mirroring
    batch = test.get(range(len(test)))
    assert not batch["mirrored"].any()
    assert batch["start_frame"].tolist() == list(range(0, n - T, T))
    shapes = {k: tuple(v.shape[1:]) for k, v in batch.items()}
    assert shapes == {"T_world_cpf": (T + 1, 4, 4), "betas": (16,), "body_rotmats": (T, 21, 3, 3),
                      "hand_rotmats": (T, 30, 3, 3), "contacts": (T, 21), "T_world_root": (T, 4, 4),
                      "joints_world": (T, 22, 3), "start_frame": (), "mirrored": ()}
    assert test.sequence_names([0, 1]) == ["walk", "walk"]


def test_head_pose_is_fk_head_joint_times_cpf_offset(moving, model):
    batch = moving["train"].get(range(len(moving["train"])))
    local = torch.cat([batch["body_rotmats"], batch["hand_rotmats"]], dim=-3)
    betas = batch["betas"][:, None]  # (B, 1, 16) over frames
    fk = model.forward_kinematics(local, betas=betas, T_world_root=batch["T_world_root"])
    T_world_head = fk.T_world_joint[..., 15, :, :]
    expected = T_world_head @ model.T_head_cpf(betas)
    torch.testing.assert_close(batch["T_world_cpf"][:, 1:], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["joints_world"], fk.t_world_joint[..., :22, :], atol=1e-5, rtol=0)
    # and the root recovered from the headset (docs/ego_motion_data.md) is the stored root
    root = model.root_from_cpf(batch["T_world_cpf"][:, 1:], local, betas)
    torch.testing.assert_close(root, batch["T_world_root"], atol=1e-5, rtol=0)


def test_window_holds_t_plus_one_head_poses_and_t_targets(moving, model):
    """Pose i of T_world_cpf is frame s + i; target i is frame s + 1 + i (x = 0.02 m * frame)."""
    batch = moving["train"].get(range(len(moving["train"])))
    keep = ~batch["mirrored"]
    s = batch["start_frame"][keep]
    assert torch.equal(s[1:] - s[:-1], torch.full_like(s[1:], T // 2))
    root_x = batch["T_world_root"][keep][..., 0, 3].double()  # pelvis x = trans x + J_0 x (= 0)
    torch.testing.assert_close(root_x, 0.02 * (s[:, None] + 1 + torch.arange(T)).double(), atol=1e-5, rtol=0)
    # window k+1 starts T/2 frames later: its extra leading head pose (frame s + T/2) is pose T/2 of
    # window k, and the headset of window k's target T/2 - 1 (the same frame) by FK.
    cpf = batch["T_world_cpf"][keep]
    torch.testing.assert_close(cpf[1:, 0], cpf[:-1, T // 2])
    local = torch.cat([batch["body_rotmats"], batch["hand_rotmats"]], -3)[keep][:-1, T // 2 - 1]
    head = model.T_world_cpf_from_root(batch["T_world_root"][keep][:-1, T // 2 - 1], local,
                                       batch["betas"][keep][:-1])
    torch.testing.assert_close(cpf[1:, 0], head, atol=1e-5, rtol=0)


def test_contacts_hand_made_foot():
    """Left ankle: still at 8 cm (0-9), slides at 1 m/s (10-19), still at 30 cm (20-29)."""
    n = 30
    joints = torch.zeros(n, 22, 3)
    joints[:, :, 2] = 1.0  # every other joint high above the floor
    ankle = joints[:, 7]
    ankle[:, 2] = 0.08
    ankle[10:20, 0] = torch.arange(1, 11) / 30.0  # 1 m/s
    ankle[20:, 0] = 10 / 30.0
    ankle[20:, 2] = 0.30
    joints[:, 10, 2] = 0.12  # left toe: still, but above its 0.10 m threshold
    joints[:, 11, 2] = 0.04  # right toe: still, low -> contact throughout
    contacts = compute_contacts(joints, ContactThresholds())
    # frame 9's central difference already sees the slide: (1/30 m) * 30 / 2 = 0.5 m/s > 0.3
    expected_ankle = torch.tensor([1.0] * 9 + [0.0] * 21)
    torch.testing.assert_close(contacts[:, 6], expected_ankle)
    assert contacts[:, 9].sum() == 0 and contacts[:, 10].sum() == n
    others = [j for j in range(21) if j not in (6, 10)]
    assert contacts[:, others].sum() == 0


def test_contacts_standing_then_sliding_body(tmp_path, body_path):
    """Through the whole pipeline: a standing body has foot contacts, a sliding one (0.9 m/s) none."""
    n = 120
    x = np.where(np.arange(n) < 60, 0.0, 0.03 * (np.arange(n) - 59))
    _write_amass(tmp_path / "slide.npz", np.zeros((n, 51, 3)), _standing_trans(n, x))
    w = load_windows("test", source=_source(tmp_path, [], ["slide"]), config=WindowConfig(window_frames=T),
                     body_model_path=body_path, cache_dir=tmp_path / "cache")
    batch = w.get(range(len(w)))
    frame = batch["start_frame"][:, None] + 1 + torch.arange(T)  # (B, T) absolute target frames
    feet = [6, 7, 9, 10]  # ankles and toes among the 21
    standing, sliding = frame <= 58, frame >= 60
    assert standing.any() and sliding.any()
    assert (batch["contacts"][standing][:, feet] == 1).all()
    assert (batch["contacts"][sliding][:, feet] == 0).all()
    assert batch["contacts"][..., [j for j in range(21) if j not in feet]].sum() == 0
    ankle_z = batch["joints_world"][..., 7, 2]
    torch.testing.assert_close(ankle_z, torch.full((len(w), T), 0.09), atol=1e-5, rtol=0)


def test_mirrored_window_joints_are_mirrored_joints(moving):
    train = moving["train"]
    batch = train.get(range(len(train)))
    plain, mirror = ~batch["mirrored"], batch["mirrored"]
    assert torch.equal(batch["start_frame"][plain], batch["start_frame"][mirror])
    pad = torch.zeros(*batch["joints_world"][plain].shape[:-2], 30, 3)
    expected = mirror_joint_positions(torch.cat([batch["joints_world"][plain], pad], -2))[..., :22, :]
    torch.testing.assert_close(batch["joints_world"][mirror], expected, atol=1e-5, rtol=0)
    perm = [SMPLH_MIRROR_PERMUTATION[j] - 1 for j in range(1, 22)]
    torch.testing.assert_close(batch["contacts"][mirror], batch["contacts"][plain][..., perm])
    assert not torch.allclose(batch["joints_world"][mirror], batch["joints_world"][plain], atol=1e-3)


def test_resampling_60_and_120_fps_decimates_and_50_fps_interpolates():
    n_src = 241
    k = torch.arange(n_src, dtype=torch.float64)
    axis = torch.tensor([0.3, -0.5, 0.8], dtype=torch.float64)
    axis = axis / axis.norm()
    for fps in (60.0, 120.0, 50.0):
        angle = 2.0 * k / fps  # 2 rad/s about a fixed axis; trans moves 1 m/s along x
        rot = axis_angle_to_matrix(angle[:, None, None] * axis)  # (N, 1, 3, 3)
        trans = torch.stack([k / fps, torch.zeros_like(k), torch.ones_like(k)], -1)
        rot30, trans30 = resample_to_fps(rot, trans, fps)
        t = torch.arange(rot30.shape[0], dtype=torch.float64) / 30.0
        assert rot30.shape[0] == math.floor((n_src - 1) / fps * 30 + 1e-9) + 1
        if fps != 50.0:  # integer ratio: exactly every (fps / 30)-th frame
            step = int(fps // 30)
            assert torch.equal(rot30, rot[::step]) and torch.equal(trans30, trans[::step])
        torch.testing.assert_close(trans30[:, 0], t, atol=1e-9, rtol=0)
        expected = axis_angle_to_matrix((2.0 * t)[:, None, None] * axis)
        assert geodesic_angle(rot30, expected).max() < 1e-6


def test_60_fps_file_gives_30_fps_windows(tmp_path, body_path):
    n = 120  # 2 s at 60 fps -> 60 frames at 30 fps
    _write_amass(tmp_path / "fast.npz", np.zeros((n, 51, 3)), _standing_trans(n, np.arange(n) / 60.0),
                 fps=60.0, betas=np.linspace(0.5, 1.0, 10))  # 10 AMASS betas, padded to 16 with zeros
    w = load_windows("test", source=_source(tmp_path, [], ["fast"]), config=WindowConfig(window_frames=T),
                     body_model_path=body_path, cache_dir=tmp_path / "cache")
    assert len(w) == (60 - T - 1) // T + 1
    batch = w.get(range(len(w)))
    frame = batch["start_frame"][:, None] + 1 + torch.arange(T)
    torch.testing.assert_close(batch["T_world_root"][..., 0, 3], frame / 30.0, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch["betas"][0, 10:], torch.zeros(6))
    torch.testing.assert_close(batch["betas"][0, :10], torch.linspace(0.5, 1.0, 10))


def test_bad_files_are_skipped_with_logged_reasons(tmp_path, body_path, caplog):
    n = 40
    good = _write_amass(tmp_path / "good.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    nan_body = np.zeros((n, 51, 3))
    nan_body[5, 3] = np.nan
    _write_amass(tmp_path / "nan_frames.npz", nan_body, _standing_trans(n))
    _write_amass(tmp_path / "too_short.npz", np.zeros((T, 51, 3)), _standing_trans(T))
    _write_amass(tmp_path / "no_trans.npz", np.zeros((n, 51, 3)), _standing_trans(n), drop=("trans",))
    _write_amass(tmp_path / "zero_fps.npz", np.zeros((n, 51, 3)), _standing_trans(n), fps=0.0)
    bad = ["nan_frames", "too_short", "no_trans", "zero_fps"]
    kw = dict(config=WindowConfig(window_frames=T), body_model_path=body_path, cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.WARNING, logger="tasks.ego_motion.data.windows"):
        w = load_windows("test", source=_source(tmp_path, [], [good.stem, *bad]), **kw)
    assert set(w.sequence_names(range(len(w)))) == {"good"}
    messages = [r.getMessage() for r in caplog.records]
    reasons = {"nan_frames": "NaN", "too_short": "too short", "no_trans": "trans",
               "zero_fps": "mocap_framerate"}
    for stem, why in reasons.items():
        assert any(f"skipping {tmp_path / stem}.npz" in m and why in m for m in messages), (stem, messages)
    assert any("skipped 4 of 5 files" in m for m in messages)
    assert set(w.summary["skipped"]) == {str(tmp_path / f"{s}.npz") for s in bad}
    with pytest.raises(ValueError, match="no 16-frame windows.*too short"):
        load_windows("train", source=_source(tmp_path, bad, []), **kw)


def test_cache_reused_when_unchanged_and_rebuilt_on_change(tmp_path, body_path, monkeypatch):
    n = 40
    src = tmp_path / "src"
    _write_amass(src / "a.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    source = _source(src, ["a"], [])
    monkeypatch.setenv(data.ENV_CACHE_ROOT, str(tmp_path / "cache_root"))
    cfg = WindowConfig(window_frames=T, include_mirrored=False)
    first = load_windows("train", source=source, config=cfg, body_model_path=body_path)
    assert not first.from_cache and first.path.parent == tmp_path / "cache_root" / "ego_motion"

    builds = []
    real_build = data.build_windows_dataset
    monkeypatch.setattr(data, "build_windows_dataset",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    again = load_windows("train", source=source, config=cfg, body_model_path=body_path)
    assert again.from_cache and again.path == first.path and builds == []
    torch.testing.assert_close(again.get([0])["T_world_cpf"], first.get([0])["T_world_cpf"])

    _write_amass(src / "a.npz", np.zeros((n, 51, 3)), _standing_trans(n, 1.0))  # content edit
    edited = load_windows("train", source=source, config=cfg, body_model_path=body_path)
    assert not edited.from_cache and edited.path != first.path and builds == [1]
    assert edited.get([0])["T_world_root"][0, 0, 0, 3] == pytest.approx(1.0)

    cfg3 = WindowConfig(window_frames=T, include_mirrored=False, train_stride_frames=3)
    restrided = load_windows("train", source=source, config=cfg3, body_model_path=body_path)
    assert not restrided.from_cache and builds == [1, 1] and len(restrided) == (n - T - 1) // 3 + 1
    assert load_windows("train", source=source, config=cfg, body_model_path=body_path).from_cache


def test_floor_is_trusted_with_a_warning_or_refloored(tmp_path, model, caplog):
    n = 40
    path = _write_amass(tmp_path / "lifted.npz", np.zeros((n, 51, 3)), _standing_trans(n) + [0.0, 0.0, 0.5])
    with caplog.at_level(logging.WARNING, logger="tasks.ego_motion.data.sequences"):
        kept = data.load_sequence(path, model, WindowConfig(window_frames=T))
    assert any("lifted.npz: lowest foot joint is at z = 0.530" in r.getMessage() for r in caplog.records)
    assert kept.contacts.sum() == 0  # 0.5 m above the floor: no contact
    floored = data.load_sequence(path, model, WindowConfig(window_frames=T, refloor="lowest_foot_joint"))
    assert floored.joints_world[:, list(FOOT_JOINTS), 2].min().abs() < 1e-6
    torch.testing.assert_close(floored.T_world_cpf[:, 2, 3], kept.T_world_cpf[:, 2, 3] - 0.53, atol=1e-5, rtol=0)
    assert floored.contacts[:, [9, 10]].all()  # toes now on the floor and still


def test_egoallo_split_by_top_level_subdataset(tmp_path):
    for rel in ("Transitions_mocap/s1/a_poses.npz", "SSM_synced/s2/b_poses.npz", "CMU/01/c_poses.npz",
                "BMLmovi/d_poses.npz", "CMU/01/shape.npz"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    source = DataSource(root=tmp_path, split_rule="egoallo")
    assert [p.stem for p in source.files("test")] == ["b_poses", "a_poses"]
    assert [p.stem for p in source.files("train")] == ["d_poses", "c_poses"]
    with pytest.raises(FileNotFoundError, match="split file"):
        DataSource(root=tmp_path, split_file=None).files("train")


def test_get_equals_torch_formatted_dataset_rows_across_chunks(moving):
    """The zero-copy ``get`` returns exactly the HF torch-formatted rows, also over several Arrow chunks."""
    test = moving["test"]
    two_chunks = datasets.concatenate_datasets([datasets.load_from_disk(str(test.path))] * 2)
    windows = data.EgoMotionWindows(two_chunks, path=test.path, summary=test.summary, from_cache=True)
    assert len(windows) == 2 * len(test) and len(windows._columns["betas"]) == 2
    idx = [len(test) + 1, 0, -1, 1, 1]
    batch = windows.get(torch.tensor(idx))
    ref = windows.dataset[[i % len(windows) for i in idx]]
    assert set(batch) == set(data.TENSOR_COLUMNS)
    for name, value in batch.items():
        assert value.dtype == ref[name].dtype and torch.equal(value, ref[name]), name
    with pytest.raises(IndexError, match="window indices"):
        windows.get([len(windows)])


def test_four_way_split_is_clip_disjoint_and_validation_is_held_out_of_grpo_and_the_prior():
    """Issue 22 item 3: validation clips are neither trained on (by the prior or by GRPO) nor tested."""
    from tasks.ego_motion.data.splits import DataSource

    source = DataSource()
    splits = ("train", "prior_train", "post_train", "validation", "test")
    files = {split: {p.stem for p in source.files(split)} for split in splits}
    assert files["prior_train"] | files["post_train"] | files["validation"] == files["train"]
    parts = ("prior_train", "post_train", "validation", "test")
    assert all(not files[a] & files[b] for i, a in enumerate(parts) for b in parts[i + 1:])
    assert len(files["post_train"]) == 11 and len(files["test"]) == 13 and len(files["prior_train"]) == 38
    # the stated rule: per activity group with two or more post-training clips, the highest clip id
    assert files["validation"] == {"005_17", "006_12", "007_09"}
    # The same CMU trial on both rigs stays on one side.
    assert ("001_01" in files["prior_train"]) == ("001_01_orig" in files["prior_train"])


def test_egoallo_rule_carves_validation_out_of_the_post_training_files(tmp_path):
    from tasks.ego_motion.data.splits import DataSource

    for i in range(60):
        (tmp_path / "CMU" / f"{i:03d}.npz").parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "CMU" / f"{i:03d}.npz").write_bytes(b"")
    (tmp_path / "Transitions_mocap").mkdir()
    (tmp_path / "Transitions_mocap" / "t.npz").write_bytes(b"")
    source = DataSource(root=tmp_path, split_rule="egoallo", post_train_fraction=0.3, validation_fraction=0.3)
    files = {s: set(source.files(s)) for s in ("train", "prior_train", "post_train", "validation", "test")}
    assert files["prior_train"] | files["post_train"] | files["validation"] == files["train"]
    assert not files["post_train"] & files["validation"] and not files["validation"] & files["test"]
    assert len(files["validation"]) < len(files["post_train"])


def test_split_file_without_post_train_names_the_fix(tmp_path):
    import json

    from tasks.ego_motion.data.splits import BUNDLED_CMU_DIR, DataSource

    split = json.loads((BUNDLED_CMU_DIR.parent / "split.json").read_text())
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": split["train"], "test": split["test"]}))
    source = DataSource(split_file=path)
    assert len(source.files("train")) == 52
    with pytest.raises(ValueError, match="no 'post_train' list"):
        source.files("post_train")
    path.write_text(json.dumps({"train": split["train"][:3], "post_train": split["test"][:1], "test": split["test"]}))
    with pytest.raises(ValueError, match="must also be listed under 'train'"):
        source.files("prior_train")
    path.write_text(json.dumps({"train": split["train"], "post_train": split["post_train"],
                                "validation": split["post_train"][:1], "test": split["test"]}))
    with pytest.raises(ValueError, match="both 'post_train' and 'validation'"):
        source.files("validation")
    path.write_text(json.dumps({"train": split["train"], "post_train": split["post_train"], "test": split["test"]}))
    with pytest.raises(ValueError, match="no 'validation' list"):
        source.files("validation")


def test_extra_prior_train_dir_adds_windows_to_prior_train_only(tmp_path, body_path):
    import dataclasses

    n = 40
    src, extra = tmp_path / "src", tmp_path / "reactidle_amass"
    for name in ("a", "b", "c"):
        _write_amass(src / f"{name}.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    (src / "split.json").write_text(json.dumps({"train": ["a", "b"], "post_train": ["b"], "test": ["c"]}))
    _write_amass(extra / "001_acted.npz", np.zeros((n, 51, 3)), _standing_trans(n, 0.5))
    base = DataSource(root=src, split_file=src / "split.json")
    source = dataclasses.replace(base, extra_prior_train_dir=extra)
    assert [p.name for p in source.files("prior_train")] == ["a.npz", "001_acted.npz"]
    for split in ("train", "post_train", "test"):
        assert source.files(split) == base.files(split)
    cfg = WindowConfig(window_frames=T, include_mirrored=False)
    windows = load_windows("prior_train", source=source, config=cfg, body_model_path=body_path,
                           cache_dir=tmp_path / "cache")
    per_clip = (n - T - 1) // (T // 2) + 1
    assert len(windows) == 2 * per_clip and windows.summary["files"] == 2
    names = windows.sequence_names(range(len(windows)))
    assert sorted(set(names)) == ["a", "extra_prior_train/001_acted"]
    # The cache fingerprint follows the extra clips' content.
    files = source.files("prior_train")
    before = data.cache_fingerprint(files, src, body_path, cfg, "prior_train", extra)
    assert before != data.cache_fingerprint(base.files("prior_train"), src, body_path, cfg, "prior_train")
    _write_amass(extra / "001_acted.npz", np.zeros((n, 51, 3)), _standing_trans(n, 0.6))
    assert data.cache_fingerprint(files, src, body_path, cfg, "prior_train", extra) != before


def test_extra_prior_train_dir_errors_name_the_fix(tmp_path):
    import dataclasses

    n = 40
    src = tmp_path / "src"
    _write_amass(src / "a.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    (src / "split.json").write_text(json.dumps({"train": ["a"], "post_train": [], "test": []}))
    base = DataSource(root=src, split_file=src / "split.json")
    with pytest.raises(FileNotFoundError, match=r"does not exist.*convert --reactidle"):
        dataclasses.replace(base, extra_prior_train_dir=tmp_path / "missing").files("prior_train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no .npz"):
        dataclasses.replace(base, extra_prior_train_dir=tmp_path / "empty").files("prior_train")
    _write_amass(src / "idle" / "x.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    with pytest.raises(ValueError, match="overlap"):
        dataclasses.replace(base, extra_prior_train_dir=src / "idle").files("prior_train")
    # The pretraining recipe checks the flag before any work, and only with the prior_train split.

    recipe = pretrain_job
    with pytest.raises(FileNotFoundError, match="does not exist"):
        recipe.Config(extra_prior_train_dir=tmp_path / "missing")
    with pytest.raises(ValueError, match="--train-split prior_train"):
        recipe.Config(extra_prior_train_dir=src / "idle", train_split="train")
    assert recipe.Config(extra_prior_train_dir=src / "idle").extra_prior_train_dir == src / "idle"


def test_extra_post_train_dir_adds_windows_to_post_train_only(tmp_path, body_path):
    import dataclasses

    n = 40
    src, extra = tmp_path / "src", tmp_path / "heads"
    for name in ("a", "b", "c"):
        _write_amass(src / f"{name}.npz", np.zeros((n, 51, 3)), _standing_trans(n))
    (src / "split.json").write_text(json.dumps({"train": ["a", "b"], "post_train": ["b"], "test": ["c"]}))
    _write_amass(extra / "idle.npz", np.zeros((n, 51, 3)), _standing_trans(n, 0.5))
    base = DataSource(root=src, split_file=src / "split.json")
    source = dataclasses.replace(base, extra_post_train_dir=extra)
    assert [p.name for p in source.files("post_train")] == ["b.npz", "idle.npz"]
    for split in ("train", "prior_train", "test"):
        assert source.files(split) == base.files(split)
    cfg = WindowConfig(window_frames=T, include_mirrored=False)
    windows = load_windows("post_train", source=source, config=cfg, body_model_path=body_path,
                           cache_dir=tmp_path / "cache")
    assert sorted(set(windows.sequence_names(range(len(windows))))) == ["b", "extra_post_train/idle"]
    with pytest.raises(FileNotFoundError, match="--task.extra-post-train-dir"):
        dataclasses.replace(base, extra_post_train_dir=tmp_path / "missing").files("post_train")
