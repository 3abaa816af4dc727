"""Tests of the head-trajectory condition: channel layout on hand-built trajectories, the Fourier
formula, invariance to world yaw and horizontal translation, batch axes and input validation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tasks.ego_motion.body.geometry import axis_angle_to_matrix, make_transform, rotation_about_z
from tasks.ego_motion.model.condition import (
    ENCODED_COS,
    ENCODED_RAW,
    ENCODED_SIN,
    FOURIER_FREQUENCIES,
    NUM_CONDITION_FEATURES,
    RAW_CPF_HEIGHT,
    RAW_CPF_ROTATION_NO_YAW,
    RAW_RELATIVE_POSE,
    encode_head_trajectory,
    fourier_encode,
    raw_head_features,
)

DTYPE = torch.float64

# A CPF looking along world +X, upright: local +Z (forward) -> world +X, local +Y (down in the
# camera convention) -> world -Z, local +X -> world -Y. Columns are the local axes in the world.
R_WORLD_CPF_FACING_X = torch.tensor([[0.0, 0.0, 1.0], [-1.0, 0.0, 0.0], [0.0, -1.0, 0.0]], dtype=DTYPE)


def _random_trajectory(gen: torch.Generator, batch: tuple[int, ...], num_poses: int) -> torch.Tensor:
    axis_angle = torch.randn(*batch, num_poses, 3, generator=gen, dtype=DTYPE)
    translation = torch.randn(*batch, num_poses, 3, generator=gen, dtype=DTYPE)
    return make_transform(axis_angle_to_matrix(axis_angle), translation)


def test_constants_describe_154_features() -> None:
    assert NUM_CONDITION_FEATURES == 154
    assert (RAW_RELATIVE_POSE.stop, RAW_CPF_HEIGHT.stop, RAW_CPF_ROTATION_NO_YAW.stop) == (12, 13, 22)
    assert (ENCODED_RAW.stop, ENCODED_SIN.stop, ENCODED_COS.stop) == (22, 88, 154)


def test_facing_x_rotation_is_proper() -> None:
    assert torch.det(R_WORLD_CPF_FACING_X).item() == pytest.approx(1.0)


def test_forward_walk_at_known_speed() -> None:
    # 1.5 m/s along world +X at 30 fps = 0.05 m per frame, head at 1.6 m, facing +X.
    num_poses = 5
    positions = torch.tensor([[0.05 * t, 2.0, 1.6] for t in range(num_poses)], dtype=DTYPE)
    T_world_cpf = make_transform(R_WORLD_CPF_FACING_X.expand(num_poses, 3, 3), positions)
    raw = raw_head_features(T_world_cpf)
    assert raw.shape == (num_poses - 1, 22)
    # Relative pose: identity rotation, and the step is along the previous CPF's local +Z.
    expected_rel = torch.tensor([1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0.05], dtype=DTYPE)
    torch.testing.assert_close(raw[:, RAW_RELATIVE_POSE], expected_rel.expand(num_poses - 1, 12))
    torch.testing.assert_close(raw[:, RAW_CPF_HEIGHT], torch.full((num_poses - 1, 1), 1.6, dtype=DTYPE))
    # Already facing +X: yaw is 0 and the rotation channels are the rotation itself.
    torch.testing.assert_close(
        raw[:, RAW_CPF_ROTATION_NO_YAW], R_WORLD_CPF_FACING_X.flatten().expand(num_poses - 1, 9)
    )


def test_relative_pose_of_a_turn_in_place() -> None:
    # The head turns left by 0.1 rad per frame about world +Z, i.e. about the CPF's local -Y axis.
    yaws = torch.tensor([0.0, 0.1, 0.2], dtype=DTYPE)
    R = rotation_about_z(yaws) @ R_WORLD_CPF_FACING_X
    T_world_cpf = make_transform(R, torch.tensor([0.0, 0.0, 1.7], dtype=DTYPE).expand(3, 3))
    raw = raw_head_features(T_world_cpf)
    R_rel = raw[:, RAW_RELATIVE_POSE].reshape(2, 3, 4)[:, :, :3]
    c, s = math.cos(0.1), math.sin(0.1)
    # Rotation by +0.1 about local -Y == rotation by -0.1 about local +Y.
    expected = torch.tensor([[c, 0.0, -s], [0.0, 1.0, 0.0], [s, 0.0, c]], dtype=DTYPE)
    torch.testing.assert_close(R_rel, expected.expand(2, 3, 3))
    torch.testing.assert_close(
        raw[:, RAW_RELATIVE_POSE].reshape(2, 3, 4)[:, :, 3], torch.zeros(2, 3, dtype=DTYPE)
    )
    # Yaw removed: every frame gives the same canonical rotation as the unturned head.
    torch.testing.assert_close(raw[:, RAW_CPF_ROTATION_NO_YAW], R_WORLD_CPF_FACING_X.flatten().expand(2, 9))


def test_yawed_and_pitched_head_has_forward_axis_in_xz_plane() -> None:
    pitch = 0.4  # +0.4 rad about the CPF's local +X axis tilts local +Z towards -Y_cpf = world up
    R_pitched = R_WORLD_CPF_FACING_X @ axis_angle_to_matrix(torch.tensor([pitch, 0.0, 0.0], dtype=DTYPE))
    R_yawed = rotation_about_z(torch.tensor(2.5, dtype=DTYPE)) @ R_pitched
    T_world_cpf = make_transform(torch.stack([R_yawed, R_yawed]), torch.zeros(2, 3, dtype=DTYPE))
    R_canon = raw_head_features(T_world_cpf)[0, RAW_CPF_ROTATION_NO_YAW].reshape(3, 3)
    forward = R_canon[:, 2]
    # Forward is (cos pitch, 0, sin pitch): horizontal part along +X, looking up, pitch unchanged.
    torch.testing.assert_close(forward, torch.tensor([math.cos(pitch), 0.0, math.sin(pitch)], dtype=DTYPE))
    torch.testing.assert_close(R_canon, R_pitched)


def test_fourier_part_matches_formula() -> None:
    gen = torch.Generator().manual_seed(3)
    T_world_cpf = _random_trajectory(gen, (2,), 6)
    raw = raw_head_features(T_world_cpf)
    encoded = encode_head_trajectory(T_world_cpf)
    assert encoded.shape == (2, 5, 154)
    torch.testing.assert_close(encoded[..., ENCODED_RAW], raw)
    for i in range(22):
        for k, c in enumerate(FOURIER_FREQUENCIES):
            torch.testing.assert_close(encoded[..., 22 + 3 * i + k], torch.sin(c * raw[..., i]))
            torch.testing.assert_close(encoded[..., 88 + 3 * i + k], torch.cos(c * raw[..., i]))


def test_fourier_encode_small_example() -> None:
    x = torch.tensor([0.5, -1.0], dtype=DTYPE)
    out = fourier_encode(x, (1.0, 2.0))
    expected = [0.5, -1.0, math.sin(0.5), math.sin(1.0), math.sin(-1.0), math.sin(-2.0),
                math.cos(0.5), math.cos(1.0), math.cos(-1.0), math.cos(-2.0)]  # fmt: skip
    torch.testing.assert_close(out, torch.tensor(expected, dtype=DTYPE))


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    yaw_rad=st.floats(-math.pi, math.pi),
    shift_x_m=st.floats(-50.0, 50.0),
    shift_y_m=st.floats(-50.0, 50.0),
)
def test_invariant_to_world_yaw_and_horizontal_translation(
    seed: int, yaw_rad: float, shift_x_m: float, shift_y_m: float
) -> None:
    gen = torch.Generator().manual_seed(seed)
    T_world_cpf = _random_trajectory(gen, (3,), 8)
    T_new_world = make_transform(
        rotation_about_z(torch.tensor(yaw_rad, dtype=DTYPE)),
        torch.tensor([shift_x_m, shift_y_m, 0.0], dtype=DTYPE),
    )
    moved = T_new_world @ T_world_cpf
    torch.testing.assert_close(
        encode_head_trajectory(moved), encode_head_trajectory(T_world_cpf), atol=1e-9, rtol=0
    )


def test_vertical_shift_changes_only_height() -> None:
    gen = torch.Generator().manual_seed(1)
    T_world_cpf = _random_trajectory(gen, (), 4)
    lifted = T_world_cpf.clone()
    lifted[..., 2, 3] += 0.25
    raw, raw_lifted = raw_head_features(T_world_cpf), raw_head_features(lifted)
    torch.testing.assert_close(raw_lifted[:, RAW_CPF_HEIGHT], raw[:, RAW_CPF_HEIGHT] + 0.25)
    torch.testing.assert_close(raw_lifted[:, RAW_RELATIVE_POSE], raw[:, RAW_RELATIVE_POSE])
    torch.testing.assert_close(raw_lifted[:, RAW_CPF_ROTATION_NO_YAW], raw[:, RAW_CPF_ROTATION_NO_YAW])


def test_arbitrary_batch_axes_match_per_sequence_encoding() -> None:
    gen = torch.Generator().manual_seed(7)
    T_world_cpf = _random_trajectory(gen, (2, 3), 5)
    batched = encode_head_trajectory(T_world_cpf)
    assert batched.shape == (2, 3, 4, 154)
    for a in range(2):
        for b in range(3):
            torch.testing.assert_close(batched[a, b], encode_head_trajectory(T_world_cpf[a, b]))
    # float32 works too and keeps its dtype.
    assert encode_head_trajectory(T_world_cpf.float()).dtype == torch.float32


def test_two_poses_give_one_frame() -> None:
    T_world_cpf = make_transform(R_WORLD_CPF_FACING_X.expand(2, 3, 3), torch.zeros(2, 3, dtype=DTYPE))
    assert encode_head_trajectory(T_world_cpf).shape == (1, 154)


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (torch.zeros(5, 3, 4, dtype=DTYPE), r"\(\.\.\., T\+1, 4, 4\)"),
        (torch.zeros(4, 4, dtype=DTYPE), r"\(\.\.\., T\+1, 4, 4\)"),
        (torch.eye(4, dtype=DTYPE)[None], "at least 2"),
    ],
)
@pytest.mark.unchecked_annotations
def test_rejects_bad_shapes(bad: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        encode_head_trajectory(bad)


@pytest.mark.unchecked_annotations
def test_rejects_nan_and_transposed_and_integer_input() -> None:
    T_world_cpf = make_transform(R_WORLD_CPF_FACING_X.expand(3, 3, 3), torch.ones(3, 3, dtype=DTYPE))
    with_nan = T_world_cpf.clone()
    with_nan[1, 0, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        encode_head_trajectory(with_nan)
    with pytest.raises(ValueError, match="transpose"):
        encode_head_trajectory(T_world_cpf.transpose(-1, -2))
    with pytest.raises(TypeError, match="floating-point"):
        encode_head_trajectory(torch.zeros(3, 4, 4, dtype=torch.int64))
