"""A MuJoCo humanoid built from the SMPL-H kinematic tree, one per body shape.

Why in code: the physics rewards need a simulated body whose bones are the body model's bones
for the shape being scored, so that a motion's joint positions and the humanoid's coincide
exactly (up to the evaluator's rounding of betas to 0.01: under 0.5 mm). The model is assembled
with ``mujoco.MjSpec`` from the rest-pose joints J(betas) (``BodyModel.shaped_joints``) and
compiled in 5-10 ms, so every predicted shape gets its own humanoid (cached by its betas).

Structure (22 bodies, one per metric joint: pelvis + SMPL-H joints 1..21):

- the pelvis has a free joint (6 dof, unactuated); each of the 21 body joints is a ball joint at
  the child's joint position, so ``qpos`` = pelvis position (3), pelvis quaternion (4), then 21
  joint quaternions (w, x, y, z) equal to the SMPL-H local rotations;
- body frames are aligned with the SMPL model frame at rest (+Y up, facing +Z, left on +X), so a
  body's world rotation is R_world_parent @ R_local and its position is
  p_parent + R_world_parent @ (J_child - J_parent): SMPL-H forward kinematics exactly;
- one collision geom per body (capsules, a sphere for the head, and for each foot two boxes, a
  heel-to-toe-joint sole on the ankle body and a toe sole on the toes body, ``2 x sole_half_width_m``
  wide, whose bottom face lies ``sole_below_toe_m`` under the toe joint), with the segment mass
  fractions of de Leva (1996), "Adjustments to Zatsiorsky-Seluyanov's segment inertia
  parameters", J. Biomech. 29(9), Table 4 (males), times ``body_mass_kg``; inertias follow
  from the geom shapes;
- a floor plane at z = 0 (the data's floor, ``data/windows.py``); bodies collide with the floor only;
- a site (no mass, no collision) at each bottom corner of the four sole boxes, so that the simulator computes the
  16 contact candidates with the kinematics (``Humanoid.foot_site_ids``; ``Humanoid.foot_points`` is the same from
  the geoms' poses, for batches of frames).

Two compiled models per shape: ``model`` (no joint springs, contacts disabled: inverse dynamics
and kinematics) and ``tracker_model`` (joint springs and dampers that act as the PD tracker of
``tracking.py``, contacts on).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import mujoco
import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

from ..body.geometry import NUM_BODY_JOINTS, SMPLH_PARENTS, matrix_to_quaternion

NUM_HUMANOID_BODIES = NUM_BODY_JOINTS + 1  # pelvis + 21 body joints
FOOT_BODIES: tuple[str, ...] = ("left_ankle", "left_foot", "right_ankle", "right_foot")
"""Bodies whose box soles are the feet: the 4 corners of each sole's bottom face are the floor-contact candidates."""
POINTS_PER_SOLE = 4
"""Contact candidates per foot body: the bottom corners of its sole box (heel/toe end x inner/outer edge)."""
SOLE_CORNER_SIGNS = np.array([[-1, -1, -1], [1, -1, -1], [-1, -1, 1], [1, -1, 1]], dtype=float)
"""(4 corners, 3) the bottom corners of a sole box in units of its half sizes, in its geom frame (local -y is down, z
from heel to toe, x across): (back, -x), (back, +x), (front, -x), (front, +x)."""
GRAVITY_M_PER_S2 = 9.81

JOINT_NAMES: tuple[str, ...] = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2", "left_ankle",
    "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar", "right_collar", "head",
    "left_shoulder", "right_shoulder", "left_elbow", "right_elbow", "left_wrist", "right_wrist",
)  # fmt: skip
"""SMPL-H joint names 0..21; body i of the humanoid is joint i."""

DE_LEVA_MALE_MASS_PERCENT: dict[str, float] = {
    "head_neck": 6.94, "upper_trunk": 15.96, "middle_trunk": 16.33, "lower_trunk": 11.17,
    "upper_arm": 2.71, "forearm": 1.62, "hand": 0.61, "thigh": 14.16, "shank": 4.33, "foot": 1.37,
}  # fmt: skip
"""Segment masses in percent of body mass, de Leva (1996) Table 4, males (they sum to 100 over
the 16 segments: head+neck, three trunk parts, and both arms and legs)."""

COLLAR_SHARE_OF_UPPER_TRUNK = 0.094
"""Each collar body takes this fraction of de Leva's upper trunk (the shoulder girdle; the rest
stays on spine3). An assumption of this module, not a measured value."""
NECK_SHARE_OF_HEAD_NECK = 0.15
"""The neck body's fraction of de Leva's head+neck segment (the rest is the head). An assumption."""
TOES_SHARE_OF_FOOT = 0.2
"""The toes body's fraction of de Leva's foot (the rest hangs on the ankle body). An assumption."""


def segment_mass_fractions() -> tuple[float, ...]:
    """Mass fraction of each of the 22 bodies (sums to 1), from :data:`DE_LEVA_MALE_MASS_PERCENT`."""
    p = {k: v / 100.0 for k, v in DE_LEVA_MALE_MASS_PERCENT.items()}
    collar = COLLAR_SHARE_OF_UPPER_TRUNK * p["upper_trunk"]
    foot, toes = (1 - TOES_SHARE_OF_FOOT) * p["foot"], TOES_SHARE_OF_FOOT * p["foot"]
    by_name = {
        "pelvis": p["lower_trunk"], "spine1": p["middle_trunk"] / 2, "spine2": p["middle_trunk"] / 2,
        "spine3": p["upper_trunk"] - 2 * collar, "neck": NECK_SHARE_OF_HEAD_NECK * p["head_neck"],
        "head": (1 - NECK_SHARE_OF_HEAD_NECK) * p["head_neck"],
    }  # fmt: skip
    for side in ("left", "right"):
        by_name.update({f"{side}_hip": p["thigh"], f"{side}_knee": p["shank"], f"{side}_ankle": foot,
                        f"{side}_foot": toes, f"{side}_collar": collar, f"{side}_shoulder": p["upper_arm"],
                        f"{side}_elbow": p["forearm"], f"{side}_wrist": p["hand"]})
    return tuple(by_name[name] for name in JOINT_NAMES)


@dataclass(frozen=True)
class HumanoidConfig:
    """Physical parameters of the humanoid (SI units)."""

    body_mass_kg: float = 70.0
    """Total mass, split over the segments by de Leva's fractions."""
    friction: float = 1.0
    """Sliding friction coefficient between the feet (any geom) and the floor."""
    timestep_s: float = 1.0 / 120.0
    """Simulation step of the tracker (4 steps per 30 fps frame; the control update every 2). MuJoCo keeps a
    contact's time constant at least 2 steps (its default 0.02 s becomes 0.033 s at 1/60 s), and its soft contact
    scales with the effective mass it acts on: at 1/60 s a leg torque that pushes the light foot down sank the
    sole 5-10 cm into the floor. On the 65 floor-contact post-train motions (each also served mirrored; the other
    defaults as they are, in-sample), the ground truth succeeded on 48 at 1/60 s, 62 at 1/120 s and 60 at 1/180 s
    (docs/ego_motion_rlpf.md): 1/60 s is clearly worse; 1/120 s against 1/180 s is within noise."""
    sole_below_toe_m: float = 0.025
    """Height of the toe joint above the sole: the sole boxes' half height (their centre is at toe-joint height)."""
    sole_half_width_m: float = 0.04
    """Half the width of the sole boxes (m). A foot with width resists a roll moment on one foot: a heel-to-toe
    line (the earlier capsule foot) cannot, so single stance could not balance sideways without root help."""
    heel_behind_ankle_m: float = 0.06
    """How far the heel end of the ankle's sole box sits behind the ankle joint."""
    tracker_frequency_hz: float = 6.0
    """Natural frequency of each joint's PD loop: kp = I w^2, kd = 2 zeta I w with I the joint's
    subtree mass times its squared distance to the subtree's centre of mass at rest."""
    tracker_damping_ratio: float = 1.0
    armature: float = 0.01
    """Rotor inertia added to every joint dof (kg m^2), which keeps the light hand and toe bodies stable."""
    radii_m: dict[str, float] = field(default_factory=lambda: {
        "pelvis": 0.085, "spine": 0.1, "spine3": 0.11, "neck": 0.05, "head": 0.1, "collar": 0.045,
        "upper_arm": 0.045, "forearm": 0.035, "hand": 0.03, "thigh": 0.065, "shank": 0.05,
    })  # fmt: skip
    """Capsule radii per segment (metres), an assumption sized for an adult."""

    def __post_init__(self) -> None:
        for name in ("body_mass_kg", "timestep_s", "sole_below_toe_m", "sole_half_width_m", "tracker_frequency_hz",
                     "tracker_damping_ratio"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"HumanoidConfig.{name} must be a finite number > 0, got {value!r}.")
        for name in ("heel_behind_ankle_m", "armature"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"HumanoidConfig.{name} must be finite and >= 0, got {value!r}.")
        bad = {k: v for k, v in self.radii_m.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"HumanoidConfig.radii_m must be finite and > 0, got {bad}.")
        if not (self.friction >= 0 and math.isfinite(self.friction)):
            raise ValueError(f"HumanoidConfig.friction must be finite and >= 0, got {self.friction!r}.")


@dataclass
class Humanoid:
    """The compiled humanoid of one body shape.

    Attributes:
        model: MjModel without springs and with contacts disabled (inverse dynamics, kinematics).
        tracker_model: MjModel with PD springs/dampers on the 21 ball joints and floor contacts.
        rest_joints: (22, 3) rest-pose joint positions in the model frame (m) it was built from.
        total_mass_kg: sum of the body masses.
        config: the :class:`HumanoidConfig` used.
    """

    model: mujoco.MjModel
    tracker_model: mujoco.MjModel
    rest_joints: np.ndarray
    total_mass_kg: float
    config: HumanoidConfig
    body_ids: np.ndarray = field(init=False)
    """(22,) MuJoCo body id of SMPL-H joint i (the world body is id 0)."""
    qpos_adr: np.ndarray = field(init=False)
    """(21,) qpos address of the quaternion of SMPL-H joint i + 1."""
    dof_adr: np.ndarray = field(init=False)
    """(21,) first dof address of SMPL-H joint i + 1 (3 dofs each)."""
    geom_ids: np.ndarray = field(init=False)
    """(22,) collision geom id of body i."""
    foot_site_ids: np.ndarray = field(init=False)
    """(16,) MuJoCo site id of each of :meth:`foot_points`' points (the same ids in both models): the simulator
    computes the sole corners' world positions (``MjData.site_xpos``) with the kinematics, so a control update
    reads them instead of recomputing them from the geoms' poses."""

    def __post_init__(self) -> None:
        # Compiled bodies and joints are numbered depth-first, not in SMPL-H order: look them up by name.
        self.body_ids = np.array([self.model.body(name).id for name in JOINT_NAMES])
        joint_ids = [self.model.joint(name).id for name in JOINT_NAMES[1:]]
        self.qpos_adr = np.array([self.model.jnt_qposadr[j] for j in joint_ids])
        self.dof_adr = np.array([self.model.jnt_dofadr[j] for j in joint_ids])
        self.geom_ids = np.array([self.model.geom(name).id for name in JOINT_NAMES])
        index = [JOINT_NAMES.index(name) for name in FOOT_BODIES]
        half = self.model.geom_size[self.geom_ids[index]]  # (4, 3): half width, half height, half length
        self._soles = (index, SOLE_CORNER_SIGNS[None] * half[:, None])
        self.foot_site_ids = np.array([self.tracker_model.site(_corner_site(name, c)).id for name in FOOT_BODIES
                                       for c in range(POINTS_PER_SOLE)])

    @property
    def weight_n(self) -> float:
        """m g in newtons."""
        return self.total_mass_kg * GRAVITY_M_PER_S2

    def qpos(self, T_world_root: Float[Tensor, "T 4 4"], body_rotmats: Float[Tensor, "T 21 3 3"]) -> np.ndarray:
        """MuJoCo generalized positions (T, nq = 7 + 21 * 4) of a motion, float64: pelvis position and
        quaternion (w, x, y, z), then each SMPL-H joint's local rotation as a quaternion at its address.

        Frames: ``T_world_root`` is the pelvis joint's world pose (rotation = global orientation, +Z
        up world), ``body_rotmats`` the local rotations of joints 1..21, as ``decode_motion`` returns.
        """
        T = T_world_root.shape[0]
        if T_world_root.shape != (T, 4, 4) or body_rotmats.shape != (T, NUM_BODY_JOINTS, 3, 3):
            raise ValueError(f"expected T_world_root (T, 4, 4) and body_rotmats (T, 21, 3, 3), got "
                             f"{tuple(T_world_root.shape)} and {tuple(body_rotmats.shape)}.")
        R = torch.cat([T_world_root[:, None, :3, :3], body_rotmats], dim=1).double()  # (T, 22, 3, 3)
        quats = matrix_to_quaternion(R).detach().cpu().numpy()  # (T, 22, 4) w, x, y, z
        qpos = np.empty((T, self.model.nq))
        qpos[:, :3] = T_world_root[:, :3, 3].detach().cpu().double().numpy()
        qpos[:, 3:7] = quats[:, 0]
        for j in range(NUM_BODY_JOINTS):
            qpos[:, self.qpos_adr[j]: self.qpos_adr[j] + 4] = quats[:, j + 1]
        return qpos

    def geom_poses(self, qpos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World poses of the 22 collision geoms per frame: positions (T, 22, 3) m and rotations (T, 22, 3, 3),
        in SMPL-H joint order, by forward kinematics of ``qpos`` (T, nq)."""
        data = mujoco.MjData(self.model)
        positions = np.empty((qpos.shape[0], NUM_HUMANOID_BODIES, 3))
        rotations = np.empty((qpos.shape[0], NUM_HUMANOID_BODIES, 9))
        q, geom_xpos, geom_xmat, ids = data.qpos, data.geom_xpos, data.geom_xmat, self.geom_ids  # views
        for t in range(qpos.shape[0]):
            q[:] = qpos[t]
            mujoco.mj_kinematics(self.model, data)
            positions[t] = geom_xpos[ids]
            rotations[t] = geom_xmat[ids]
        return positions, rotations.reshape(-1, NUM_HUMANOID_BODIES, 3, 3)

    def lowest_points(self, geom_xpos: np.ndarray, geom_xmat: np.ndarray) -> np.ndarray:
        """(..., 22) height (m) of the lowest point of each geom, from :meth:`geom_poses`' arrays (capsules,
        the head sphere, the sole boxes)."""
        kind, size = self.model.geom_type[self.geom_ids], self.model.geom_size[self.geom_ids]
        is_box, is_capsule = kind == mujoco.mjtGeom.mjGEOM_BOX, kind == mujoco.mjtGeom.mjGEOM_CAPSULE
        vertical = np.abs(geom_xmat[..., 2, :])  # (..., 22, 3): |z component| of each local axis
        box_extent = (vertical * size).sum(axis=-1)
        round_extent = np.where(is_capsule, size[:, 1], 0.0) * vertical[..., 2] + size[:, 0]
        return geom_xpos[..., 2] - np.where(is_box, box_extent, round_extent)

    @property
    def foot_point_bodies(self) -> np.ndarray:
        """(16,) MuJoCo body id of each of :meth:`foot_points`' points."""
        return np.repeat(self.body_ids[[JOINT_NAMES.index(name) for name in FOOT_BODIES]], POINTS_PER_SOLE)

    def foot_points(self, geom_xpos: np.ndarray, geom_xmat: np.ndarray) -> np.ndarray:
        """(..., 16, 3) world positions of the bottom corners of the four sole boxes, from :meth:`geom_poses`'
        arrays (or one state's (22, 3) and (22, 3, 3)): for each of ``FOOT_BODIES`` (left ankle, left toes, right
        ankle, right toes) the corners (back, -x), (back, +x), (front, -x), (front, +x) of its bottom face (local
        -y; local z points from heel to toe, local x across the foot)."""
        index, local = self._soles  # (4,) SMPL-H joints of the soles, (4 soles, 4 corners, 3) corners in geom frames
        centre, R = geom_xpos[..., index, :], geom_xmat[..., index, :, :]  # (..., 4, 3), (..., 4, 3, 3)
        corners = centre[..., None, :] + local @ np.swapaxes(R, -1, -2)  # (..., 4, 4, 3): R @ corner per sole
        return corners.reshape(*corners.shape[:-3], POINTS_PER_SOLE * len(FOOT_BODIES), 3)


def fresh_data(model: mujoco.MjModel, data: mujoco.MjData | None, name: str) -> mujoco.MjData:
    """``data`` reset to ``model``'s initial state (``mj_resetData``), or a new ``MjData`` when None: a run that reuses
    one starts as a run with a new one would.

    Raises:
        ValueError: ``data`` belongs to another model (``name`` says which one it should be: e.g.
            "humanoid.tracker_model").
    """
    if data is None:
        return mujoco.MjData(model)
    if data.model is not model:
        raise ValueError(f"data must be an MjData of {name} (mujoco.MjData({name})).")
    mujoco.mj_resetData(model, data)
    return data


def _sole_box(heel: np.ndarray, toe: np.ndarray, cfg: HumanoidConfig) -> dict:
    """``add_geom`` arguments of a sole box from ``heel`` to ``toe`` (body frame, model axes: +Y up), its centre
    at their height: local z along the foot, local y up (the bottom face is local -y), local x across."""
    z = (toe - heel) / np.linalg.norm(toe - heel)
    y = np.array([0.0, 1.0, 0.0]) - z[1] * z
    y /= np.linalg.norm(y)
    quat = np.empty(4)
    mujoco.mju_mat2Quat(quat, np.stack([np.cross(y, z), y, z], axis=1).reshape(-1))
    return dict(type=mujoco.mjtGeom.mjGEOM_BOX, pos=((heel + toe) / 2).tolist(), quat=quat.tolist(),
                size=[cfg.sole_half_width_m, cfg.sole_below_toe_m, float(np.linalg.norm(toe - heel)) / 2])


def _sole_corners(box: dict) -> np.ndarray:
    """(4, 3) the bottom corners (:data:`SOLE_CORNER_SIGNS` order) of the sole box ``box`` (``_sole_box``'s
    arguments) in its body's frame: centre + R(quat) (signs x half sizes)."""
    corners = np.empty((POINTS_PER_SOLE, 3))
    for c, signs in enumerate(SOLE_CORNER_SIGNS):
        mujoco.mju_rotVecQuat(corners[c], signs * np.asarray(box["size"]), np.asarray(box["quat"]))
    return corners + np.asarray(box["pos"])


def _corner_site(body: str, corner: int) -> str:
    """Name of the site at corner ``corner`` (:data:`SOLE_CORNER_SIGNS` order) of ``body``'s sole."""
    return f"{body}_sole_corner{corner}"


def _capsule_spec(name: str, offsets: np.ndarray, cfg: HumanoidConfig) -> tuple[str, list[float], float]:
    """(geom type, fromto or pos, radius) of joint ``name``'s geom in its body frame (model axes); the feet's
    (``_sole_box``) are "sole" with (heel, toe) points."""
    i = JOINT_NAMES.index(name)
    children = [c for c in range(1, NUM_HUMANOID_BODIES) if SMPLH_PARENTS[c] == i]
    r = cfg.radii_m
    zero = [0.0, 0.0, 0.0]
    if name == "pelvis":
        return "capsule", [*offsets[1], *offsets[2]], r["pelvis"]
    if name == "head":
        return "sphere", [0.0, 0.09, 0.02], r["head"]
    if name.endswith("_ankle"):
        toe = offsets[children[0]]
        heel = [0.0, float(toe[1]), -cfg.heel_behind_ankle_m]
        return "sole", [*heel, *toe], cfg.sole_below_toe_m
    if name.endswith("_foot"):
        return "sole", [*zero, 0.0, 0.0, 0.05], cfg.sole_below_toe_m
    if name.endswith("_wrist"):
        forearm = offsets[i]  # wrist relative to elbow
        tip = 0.08 * forearm / max(np.linalg.norm(forearm), 1e-9)
        return "capsule", [*zero, *tip], r["hand"]
    child = children[0] if name != "spine3" else JOINT_NAMES.index("neck")
    segment = {"spine1": "spine", "spine2": "spine", "spine3": "spine3", "neck": "neck"}.get(name)
    if segment is None:
        segment = {"hip": "thigh", "knee": "shank", "collar": "collar", "shoulder": "upper_arm",
                   "elbow": "forearm"}[name.split("_", 1)[1]]
    return "capsule", [*zero, *offsets[child]], r[segment]


def _pd_gains(model: mujoco.MjModel, cfg: HumanoidConfig) -> tuple[np.ndarray, np.ndarray]:
    """(21,) kp (N m/rad) and kd (N m s/rad) per ball joint from subtree mass and CoM distance at rest."""
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    omega = 2 * math.pi * cfg.tracker_frequency_hz
    inertia = np.empty(NUM_BODY_JOINTS)
    for j in range(NUM_BODY_JOINTS):
        body = model.body(JOINT_NAMES[j + 1]).id
        dist = np.linalg.norm(data.subtree_com[body] - data.xpos[body])
        inertia[j] = model.body_subtreemass[body] * max(dist, 0.05) ** 2  # >= 5 cm lever for hands and toes
    return inertia * omega**2, 2 * cfg.tracker_damping_ratio * inertia * omega


def build_humanoid(rest_joints: Float[Tensor, "22 3"] | np.ndarray, cfg: HumanoidConfig | None = None) -> Humanoid:
    """Compile the humanoid whose joints at rest are ``rest_joints`` (22, 3), model frame, metres.

    Raises:
        ValueError: ``rest_joints`` is not (22, 3) finite, or a bone has zero length.
    """
    cfg = cfg or HumanoidConfig()
    J = np.asarray(rest_joints.detach().cpu() if isinstance(rest_joints, Tensor) else rest_joints, dtype=np.float64)
    if J.shape != (NUM_HUMANOID_BODIES, 3) or not np.isfinite(J).all():
        raise ValueError(f"rest_joints must be a finite (22, 3) array of rest-pose joints (pelvis + 21 body "
                         f"joints, model frame, metres); got shape {J.shape}.")
    offsets = np.zeros_like(J)  # joint i relative to its parent, parent frame = model axes at rest
    for i in range(1, NUM_HUMANOID_BODIES):
        offsets[i] = J[i] - J[SMPLH_PARENTS[i]]
        if np.linalg.norm(offsets[i]) < 1e-6:
            raise ValueError(f"bone {JOINT_NAMES[SMPLH_PARENTS[i]]} -> {JOINT_NAMES[i]} has zero length; "
                             "are these the body model's rest joints (BodyModel.shaped_joints)?")
    masses = [f * cfg.body_mass_kg for f in segment_mass_fractions()]

    spec = mujoco.MjSpec()
    spec.option.timestep = cfg.timestep_s
    spec.option.integrator = mujoco.mjtIntegrator.mjINT_IMPLICITFAST
    spec.worldbody.add_geom(name="floor", type=mujoco.mjtGeom.mjGEOM_PLANE, size=[0, 0, 1], contype=0,
                            conaffinity=1, friction=[cfg.friction, 0.005, 0.0001])
    bodies: list[mujoco.MjsBody] = []
    for i, name in enumerate(JOINT_NAMES):
        parent = spec.worldbody if i == 0 else bodies[SMPLH_PARENTS[i]]
        body = parent.add_body(name=name, pos=[0.0, 0.0, 0.0] if i == 0 else offsets[i].tolist())
        if i == 0:
            body.add_freejoint(name="root")
        else:
            body.add_joint(name=name, type=mujoco.mjtJoint.mjJNT_BALL, armature=cfg.armature)
        kind, where, radius = _capsule_spec(name, offsets, cfg)
        geom = dict(name=name, size=[radius, 0, 0], mass=masses[i], contype=1, conaffinity=0,
                    friction=[cfg.friction, 0.005, 0.0001])
        if kind == "sole":
            geom.update(_sole_box(np.array(where[:3]), np.array(where[3:]), cfg))
            body.add_geom(**geom)
            for c, corner in enumerate(_sole_corners(geom)):  # no mass, no collision: positions only
                body.add_site(name=_corner_site(name, c), pos=corner.tolist())
        elif kind == "sphere":
            body.add_geom(type=mujoco.mjtGeom.mjGEOM_SPHERE, pos=where, **geom)
        else:
            body.add_geom(type=mujoco.mjtGeom.mjGEOM_CAPSULE, fromto=where, **geom)
        bodies.append(body)

    tracker_model = spec.compile()
    kp, kd = _pd_gains(tracker_model, cfg)
    for j in range(NUM_BODY_JOINTS):
        joint = tracker_model.joint(JOINT_NAMES[j + 1])
        tracker_model.jnt_stiffness[joint.id] = kp[j]
        dof = tracker_model.jnt_dofadr[joint.id]
        tracker_model.dof_damping[dof: dof + 3] = kd[j]
    model = spec.compile()
    model.opt.disableflags |= mujoco.mjtDisableBit.mjDSBL_CONTACT
    return Humanoid(model=model, tracker_model=tracker_model, rest_joints=J,
                    total_mass_kg=float(sum(model.body_mass)), config=cfg)


class HumanoidCache:
    """Humanoids by body shape: betas rounded to ``decimals`` -> :class:`Humanoid` (LRU, ``capacity`` entries).

    Why: a group of samples shares a shape up to small prediction noise; compiling costs ~1 ms.
    """

    def __init__(self, rest_joints_fn, cfg: HumanoidConfig | None = None, decimals: int = 3, capacity: int = 256):
        self.rest_joints_fn = rest_joints_fn
        self.cfg = cfg or HumanoidConfig()
        self.decimals, self.capacity = decimals, capacity
        self._cache: OrderedDict[bytes, Humanoid] = OrderedDict()

    def __call__(self, betas: Float[Tensor, " nb"]) -> Humanoid:
        key_betas = torch.round(betas.detach().double().cpu(), decimals=self.decimals) + 0.0  # -0.0 -> 0.0
        key = key_betas.numpy().tobytes()
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        humanoid = build_humanoid(self.rest_joints_fn(key_betas), self.cfg)
        self._cache[key] = humanoid
        if len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return humanoid
