"""Benchmark: the MuJoCo physics evaluator per 64-frame motion, stage by stage, on one core.

Why: the physics rewards score every sample of every group (issue goal: at most 20 ms per
64-frame motion on one core, so a group of 64 takes about a second). Motions are the bundled
test split's ground-truth windows (30 fps, 64 frames); each stage's time is the median over the
windows of the best of ``--repeats`` runs. "build" compiles a new humanoid (paid once per body
shape; the evaluator caches humanoids by betas).

It also checks that the measures separate physical from non-physical versions of the same
windows (the windows whose pelvis stays below 1.2 m, i.e. not climbing): the ground truth, the
same lifted 0.3 m, leaned forward about the feet by 0 -> 60 degrees over the window, and with its
frames shuffled: tracking success rate, survival and residual force per body weight.

    python recipes/benchmarks/bench_physics.py --repeats 3 --output docs/data/bench_physics.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tasks.ego_motion.body.geometry import axis_angle_to_matrix
from tasks.ego_motion.physics.dynamics import inverse_dynamics
from tasks.ego_motion.physics.humanoid import build_humanoid
from tasks.ego_motion.physics.plausibility import plausibility
from tasks.ego_motion.physics.tracking import track
from tasks.ego_motion.task import EgoMotionTask

FPS = 30.0


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def run(repeats: int, limit: int) -> dict:
    torch.set_num_threads(1)
    task = EgoMotionTask()
    n = min(task.num_examples("test"), limit)
    batch = task.load_examples("test", torch.arange(n))
    stages: dict[str, list[float]] = {"build": [], "inverse_dynamics": [], "plausibility": [], "tracking": []}
    for i in range(n):
        betas = torch.nn.functional.pad(batch["betas"][i], (0, task.body.num_betas - 16))
        rest = task.body.shaped_joints(betas)[:22]
        stages["build"].append(_best_ms(lambda rest=rest: build_humanoid(rest), repeats))
        h = build_humanoid(rest)
        qpos = h.qpos(batch["T_world_root"][i], batch["body_rotmats"][i])
        stages["inverse_dynamics"].append(_best_ms(lambda h=h, q=qpos: inverse_dynamics(h, q, FPS), repeats))
        stages["plausibility"].append(_best_ms(lambda h=h, q=qpos: plausibility(h, q), repeats))
        stages["tracking"].append(_best_ms(lambda h=h, q=qpos: track(h, q, FPS), repeats))
    medians = {k: statistics.median(v) for k, v in stages.items()}
    medians["total, cached humanoid"] = medians["inverse_dynamics"] + medians["plausibility"] + medians["tracking"]
    return {"motions": n, "frames": int(batch["T_world_root"].shape[1]), "repeats": repeats, "median_ms": medians}


STEP_VARIANTS = {"as built (Newton, implicitfast, auto Jacobian)": {}, "sparse Jacobian": {"jacobian": 1},
                 "dense Jacobian": {"jacobian": 0}, "PGS solver": {"solver": 0}, "CG solver": {"solver": 1},
                 "Euler integrator": {"integrator": 0},
                 "tolerance 1e-6, 20 iterations": {"tolerance": 1e-6, "iterations": 20, "ls_iterations": 10}}
"""MuJoCo solver options (``MjOption`` fields) tried on the tracker model, to see whether a cheaper step exists."""


def step_costs(repeats: int, steps: int = 300) -> dict:
    """Microseconds per ``mj_step`` of the tracker model from a test window's first pose (feet on the floor),
    best of ``repeats`` runs of ``steps`` steps, for each of :data:`STEP_VARIANTS`; and the simulation steps one
    64-frame tracking takes. Why: tracking is most of the evaluator's time, and this step is a large part of it
    (the Python loop around it is the rest)."""
    import copy

    import mujoco

    task = EgoMotionTask()
    batch = task.load_examples("test", torch.arange(1))
    h = build_humanoid(task.body.shaped_joints(torch.nn.functional.pad(batch["betas"][0],
                                                                       (0, task.body.num_betas - 16)))[:22])
    qpos0 = h.qpos(batch["T_world_root"][0], batch["body_rotmats"][0])[0]
    out = {}
    for name, options in STEP_VARIANTS.items():
        model = copy.copy(h.tracker_model)
        for key, value in options.items():
            setattr(model.opt, key, value)
        best = float("inf")
        for _ in range(repeats):
            data = mujoco.MjData(model)
            data.qpos[:] = qpos0
            t0 = time.perf_counter()
            for _ in range(steps):
                mujoco.mj_step(model, data)
            best = min(best, (time.perf_counter() - t0) / steps)
        out[name] = best * 1e6
    substeps = round(1.0 / (FPS * h.tracker_model.opt.timestep))
    return {"us_per_step": out, "steps_per_64_frames": 63 * substeps}


def leaned(T_world_root: torch.Tensor, max_angle_rad: float = 1.05) -> torch.Tensor:
    """The motion rotated forward (about world x) around its ground point, 0 -> ``max_angle_rad`` over the window."""
    angles = torch.linspace(0.0, max_angle_rad, T_world_root.shape[0], dtype=T_world_root.dtype)
    R = axis_angle_to_matrix(torch.stack([angles, 0 * angles, 0 * angles], -1))
    pivot = T_world_root[:, :3, 3].clone()
    pivot[:, 2] = 0.0
    out = T_world_root.clone()
    out[:, :3, :3] = R @ T_world_root[:, :3, :3]
    out[:, :3, 3] = (R @ (T_world_root[:, :3, 3] - pivot)[..., None])[..., 0] + pivot
    return out


def separation() -> dict:
    """Tracking and residual of the test windows' ground truth and of three non-physical edits of it."""
    task = EgoMotionTask()
    batch = task.load_examples("test", torch.arange(task.num_examples("test")))
    keep = [i for i in range(len(batch["betas"])) if batch["joints_world"][i, :, 0, 2].max() < 1.2]
    rows: dict[str, dict[str, list[float]]] = {}
    shuffle = torch.randperm(batch["T_world_root"].shape[1], generator=torch.Generator().manual_seed(0))
    for i in keep:
        betas = torch.nn.functional.pad(batch["betas"][i], (0, task.body.num_betas - 16))
        h = build_humanoid(task.body.shaped_joints(betas)[:22])
        root, rot = batch["T_world_root"][i], batch["body_rotmats"][i]
        lifted = root.clone()
        lifted[:, 2, 3] += 0.3
        for name, (r, b) in {"ground truth": (root, rot), "lifted 0.3 m": (lifted, rot),
                             "leaned 0->60 deg": (leaned(root), rot),
                             "frames shuffled": (root[shuffle], rot[shuffle])}.items():
            qpos = h.qpos(r, b)
            tr = track(h, qpos, FPS)
            row = rows.setdefault(name, {"success": [], "survival": [], "residual_force_per_weight": []})
            row["success"].append(float(tr.success))
            row["survival"].append(tr.survival)
            row["residual_force_per_weight"].append(float(inverse_dynamics(h, qpos, FPS).residual_force_n.mean()
                                                          / h.weight_n))
    return {"windows": len(keep), "rows": {name: {k: statistics.mean(v) for k, v in row.items()}
                                           for name, row in rows.items()}}


def table(result: dict) -> str:
    rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in result["median_ms"].items())
    sep = result["separation"]
    checks = "\n".join(f"| {name} | {v['success']:.2f} | {v['survival']:.2f} | {v['residual_force_per_weight']:.2f} |"
                       for name, v in sep["rows"].items())
    text = (f"{result['motions']} test windows of {result['frames']} frames, best of {result['repeats']}, median "
            f"over windows, 1 thread.\n\n| stage | ms per motion |\n|---|---:|\n{rows}\n\n"
            f"Separation on {sep['windows']} test windows (means):\n\n| motion | tracking success | survival | "
            f"residual force / (m g) |\n|---|---:|---:|---:|\n{checks}\n")
    if "step_costs" in result:
        costs = result["step_costs"]
        text += (f"\nOne tracker step (`mj_step`), microseconds, best of {result['repeats']} x 300 steps; a 64-frame "
                 f"tracking takes {costs['steps_per_64_frames']} steps:\n\n| MuJoCo option | us per step |\n"
                 "|---|---:|\n" + "\n".join(f"| {k} | {v:.0f} |" for k, v in costs["us_per_step"].items()) + "\n")
    return text


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1000, help="at most this many test windows")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    args = parser.parse_args()
    result = run(args.repeats, args.limit)
    result["separation"] = separation()
    result["step_costs"] = step_costs(args.repeats)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    print(table(result))
