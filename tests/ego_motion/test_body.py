"""Body model: parity with smplx, CPF kinematics, mirroring, loading errors, the bundled build."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tasks.ego_motion.body import body_model as body_mod
from tasks.ego_motion.body.body_model import (
    BUNDLED_BODY_MODEL,
    SMPLH_EYE_VERTEX_IDS,
    default_body_model_path,
    load_body_model,
    mirror_joint_positions,
    mirror_local_rotations,
    mirror_root_pose,
)
from tasks.ego_motion.body.geometry import HEAD_JOINT, axis_angle_to_matrix, make_transform
from tasks.ego_motion.data.build_body_model import build, write_synthetic_smplh_npz
from tasks.ego_motion.data.retarget import DEFAULT_MOCAP_ROOT


@pytest.fixture(scope="module")
def bundled() -> body_mod.BodyModel:
    return load_body_model(dtype=torch.float64)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> body_mod.BodyModel:
    path = write_synthetic_smplh_npz(tmp_path_factory.mktemp("smplh") / "model.npz", seed=3)
    return load_body_model(path, dtype=torch.float64)


def _random_motion(n: int, num_betas: int, seed: int, scale: float = 0.6):
    g = torch.Generator().manual_seed(seed)
    betas = torch.randn(n, num_betas, generator=g, dtype=torch.float64)
    aa = torch.randn(n, 52, 3, generator=g, dtype=torch.float64) * scale
    transl = torch.randn(n, 3, generator=g, dtype=torch.float64)
    return betas, aa, transl


def _smplx_joints(model: body_mod.BodyModel, betas, aa, transl) -> torch.Tensor:
    return _smplx_forward(model, betas, aa, transl).joints[:, :52]


def _smplx_forward(model: body_mod.BodyModel, betas, aa, transl):
    n = aa.shape[0]
    return model.smplx_layer(
        betas=betas,
        global_orient=aa[:, 0],
        body_pose=aa[:, 1:22].reshape(n, -1),
        left_hand_pose=aa[:, 22:37].reshape(n, -1),
        right_hand_pose=aa[:, 37:].reshape(n, -1),
        transl=transl,
    )


@pytest.mark.parametrize("which", ["bundled", "synthetic"])
def test_fk_matches_smplx(which, request):
    model = request.getfixturevalue(which)
    betas, aa, transl = _random_motion(16, model.num_betas, seed=0)
    R = axis_angle_to_matrix(aa)
    T_world_root = model.T_world_root_from_amass(R[:, 0], transl, betas)
    fk = model.forward_kinematics(R[:, 1:], betas=betas, T_world_root=T_world_root)
    assert torch.allclose(fk.t_world_joint, _smplx_joints(model, betas, aa, transl), atol=1e-5, rtol=0)
    # Global rotations agree with chaining the local ones by hand along the head chain.
    R_head = R[:, 0] @ R[:, 3] @ R[:, 6] @ R[:, 9] @ R[:, 12] @ R[:, 15]
    assert torch.allclose(fk.R_world_joint[:, HEAD_JOINT], R_head, atol=1e-10)


def test_body_only_input_means_zero_hands(bundled):
    betas, aa, transl = _random_motion(4, 16, seed=1)
    aa[:, 22:] = 0.0
    R = axis_angle_to_matrix(aa)
    T = bundled.T_world_root_from_amass(R[:, 0], transl, betas)
    full = bundled.forward_kinematics(R[:, 1:], betas=betas, T_world_root=T).t_world_joint
    body_only = bundled.forward_kinematics(R[:, 1:22], betas=betas, T_world_root=T).t_world_joint
    assert torch.allclose(full, body_only, atol=1e-12)
    shaped = bundled.forward_kinematics(
        R[:, 1:22], shaped_joints=bundled.shaped_joints(betas), T_world_root=T
    )
    assert torch.allclose(shaped.t_world_joint, full, atol=1e-12)


def test_all_16_betas_are_kept(bundled, synthetic):
    # smplx would cap a (V, 3, 16) shapedirs at 10 betas; the 11th..16th must change the joints.
    for model in (bundled, synthetic):
        assert model.num_betas == 16 and model.smplx_layer.num_betas == 16
        betas = torch.zeros(16, dtype=torch.float64)
        betas[15] = 1.0
        assert (model.shaped_joints(betas) - model.J_template).abs().max() > 1e-4


def test_cpf_offset_from_eye_vertices(synthetic):
    betas, _, _ = _random_motion(3, 16, seed=2)
    zero = torch.zeros(3, 52, 3, dtype=torch.float64)
    out = _smplx_forward(synthetic, betas, zero, torch.zeros(3, 3, dtype=torch.float64))  # zero pose
    eyes = out.vertices[:, list(SMPLH_EYE_VERTEX_IDS)].mean(1)
    expected = eyes - out.joints[:, HEAD_JOINT]
    assert torch.allclose(synthetic.T_head_cpf(betas)[:, :3, 3], expected, atol=1e-10)


def test_bundled_cpf_is_the_eye_marker_midpoint(bundled):
    # The bundled mesh carries eye markers (vertices 52, 53) skinned to the head joint: in any pose
    # their midpoint is the CPF origin predicted by the kinematics.
    betas, aa, transl = _random_motion(5, 16, seed=4)
    R = axis_angle_to_matrix(aa)
    out = _smplx_forward(bundled, torch.zeros_like(betas), aa, transl)
    T_world_root = bundled.T_world_root_from_amass(R[:, 0], transl, torch.zeros_like(betas))
    T_world_cpf = bundled.T_world_cpf_from_root(T_world_root, R[:, 1:], torch.zeros_like(betas))
    assert torch.allclose(out.vertices[:, 52:54].mean(1), T_world_cpf[:, :3, 3], atol=1e-6)
    offset = bundled.T_head_cpf()[:3, 3]
    assert offset[0] == 0.0 and 0.05 < offset[1] < 0.10 and 0.05 < offset[2] < 0.12


@pytest.mark.parametrize("which", ["bundled", "synthetic"])
def test_root_from_cpf_inverts_cpf_from_root(which, request):
    model = request.getfixturevalue(which)
    betas, aa, transl = _random_motion(8, model.num_betas, seed=5)
    R = axis_angle_to_matrix(aa)
    T_world_root = make_transform(R[:, 0], transl)
    T_world_cpf = model.T_world_cpf_from_root(T_world_root, R[:, 1:], betas)
    assert torch.allclose(model.root_from_cpf(T_world_cpf, R[:, 1:22], betas), T_world_root, atol=1e-10)
    # T_root_head is the head joint from full FK with an identity root.
    fk = model.forward_kinematics(R[:, 1:], betas=betas)
    assert torch.allclose(model.T_root_head(R[:, 1:], betas), fk.T_world_joint[:, HEAD_JOINT], atol=1e-10)


def test_bundled_rest_skeleton_is_symmetric_and_adult(bundled):
    betas = torch.randn(6, 16, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    J = bundled.shaped_joints(torch.cat([torch.zeros(1, 16, dtype=torch.float64), betas]))
    rel = J - J[:, :1]
    assert torch.allclose(mirror_joint_positions(rel), rel, atol=1e-12)
    verts = bundled.smplx_layer.v_template
    stature = verts[:, 1].max() - verts[:, 1].min()
    assert 1.65 < stature < 1.75


@pytest.mark.parametrize("num_rot", [21, 51])
def test_mirrored_motion_fk_is_mirrored_fk(bundled, num_rot):
    betas, aa, transl = _random_motion(8, 16, seed=7)
    R = axis_angle_to_matrix(aa)
    T_world_root = make_transform(R[:, 0], transl)
    local = R[:, 1 : 1 + num_rot]
    fk = bundled.forward_kinematics(local, betas=betas, T_world_root=T_world_root)
    fk_m = bundled.forward_kinematics(
        mirror_local_rotations(local), betas=betas, T_world_root=mirror_root_pose(T_world_root)
    )
    assert torch.allclose(fk_m.t_world_joint, mirror_joint_positions(fk.t_world_joint), atol=1e-10)
    # Mirroring twice is the identity.
    assert torch.allclose(mirror_local_rotations(mirror_local_rotations(local)), local, atol=1e-12)


def test_missing_file_names_the_download_and_the_bundled_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="mano.is.tue.mpg.de") as err:
        load_body_model(tmp_path / "nope.npz")
    assert "Extended SMPL+H model" in str(err.value) and str(BUNDLED_BODY_MODEL) in str(err.value)


def test_wrong_keys_are_listed(tmp_path):
    path = tmp_path / "bad.npz"
    np.savez(path, v_template=np.zeros((4, 3)), f=np.zeros((1, 3)))
    with pytest.raises(KeyError, match="shapedirs"):
        load_body_model(path)


def test_env_var_overrides_default_path(monkeypatch, tmp_path):
    monkeypatch.delenv(body_mod.ENV_BODY_MODEL_PATH, raising=False)
    assert default_body_model_path() == BUNDLED_BODY_MODEL
    monkeypatch.setenv(body_mod.ENV_BODY_MODEL_PATH, str(tmp_path / "smplh.npz"))
    assert default_body_model_path() == tmp_path / "smplh.npz"


def test_betas_count_mismatch_raises(bundled):
    with pytest.raises(ValueError, match="16"):
        bundled.shaped_joints(torch.zeros(10, dtype=torch.float64))


def test_fk_is_faster_than_smplx_on_a_full_mesh(tmp_path):
    model = load_body_model(write_synthetic_smplh_npz(tmp_path / "m.npz", seed=1))
    betas, aa, transl = _random_motion(128, 16, seed=8)
    betas, aa, transl = betas.float(), aa.float(), transl.float()
    R = axis_angle_to_matrix(aa)
    with torch.no_grad():
        t0 = time.perf_counter()
        _smplx_joints(model, betas, aa, transl)
        t_smplx = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.forward_kinematics(R[:, 1:], betas=betas, T_world_root=make_transform(R[:, 0], transl))
        t_fk = time.perf_counter() - t0
    assert t_fk < t_smplx


@pytest.mark.skipif(not (DEFAULT_MOCAP_ROOT / "cmu_iclone").exists(), reason="needs ../shared/mocap")
def test_bundled_model_build_is_reproducible():
    rebuilt = build(DEFAULT_MOCAP_ROOT)
    with np.load(Path(BUNDLED_BODY_MODEL)) as shipped:
        assert sorted(shipped.files) == sorted(rebuilt)
        for key, value in rebuilt.items():
            if value.dtype.kind in "US":
                assert (shipped[key] == value).all(), key
            else:
                np.testing.assert_allclose(shipped[key], value, atol=1e-12, err_msg=key)
