"""Benchmark: the MuJoCo physics evaluator per 64-frame motion, stage by stage, on one core; and how the
balancing tracker separates real motion from non-physical edits of it.

Why: the physics rewards score every sample of every group (issue goal: at most 20 ms per 64-frame
motion on one core, so that a group of 64 takes about a second), and RLPF's success signal is only
worth its cost if the ground truth succeeds and non-physical motion does not. Motions are the
ground-truth windows that stand on the floor (``floor_contact_m = 0.15``: a foot joint within 0.15 m
of z = 0 in at least 90 % of the frames, as the RLPF recipe serves them) of the test split and of the
post-train split (where the tracker's defaults were chosen). The post-train windows are motions plus their left/right
mirrored copies, which the tracker executes alike (results equal to ~1e-14): ``--sweep`` runs the unmirrored windows
only, one per motion, and the separation counts the motions behind its windows.

- Speed: each stage's time is the median over the test windows of the best of ``--repeats`` runs;
  "build" compiles a new humanoid (paid once per body shape; the evaluator caches humanoids); "evaluator, whole
  motion" is what a physics reward pays per sample. With ``--baseline``, an older checkout's tracker and evaluator
  take turns with this one's within each repeat (ratios per window), timed by the wall clock and by the process's CPU
  time (which a machine shared with other jobs inflates less); ``--speed-only`` skips the separation.
- Separation: per split, the ground truth and the edits of ``physics/edits.py`` (lifted 0.3 m,
  leaned 0 -> 60 deg, frames shuffled, 1 m/s sliding, sunk 5 cm; and sunk 5 cm below each window's own
  contact height, ``edits.sunk_below_contact``): tracking success, survival, the tracker's root residual
  (mean over the survived frames, / m g), the inverse-dynamics residual, and the success criterion's
  planted-foot speed and unexecuted motion (``physics/criterion.py``); plus the ground truth's residual
  distribution (quantiles over windows), per window the success criteria it failed and the edits that
  succeeded on it, with its contact height (``--failures`` prints them), and the filter's counts
  against the earlier definition (a foot joint within 0.1 m of z = 0 at some frame). ``--separation-only``
  skips the speed stages.
- Sweep (``--sweep SPLIT``, with ``--tracking`` / ``--humanoid`` overrides): the ground truth alone under one
  configuration, how the tracker's defaults are chosen (on post_train): success, failing criteria, the residual's
  quantiles, the joint position error and pelvis rise; ``--sweep-edits`` also counts the motions whose edits (the
  separation's) the same configuration executes.
- Floor rule (``--floor-rule``): per split, the windows the earlier definition keeps and the current one drops, with
  their clip, mirroring and fraction of frames near the floor, and the current tracker's outcome on their ground
  truth (unmirrored windows only: a handful of simulations).

    python recipes/benchmarks/bench_physics.py --repeats 3 --speed-only --output docs/data/bench_physics.json
    python recipes/benchmarks/bench_physics.py --table-from docs/data/bench_physics.json  # the speed table
    python recipes/benchmarks/bench_physics.py --separation-only --output docs/data/bench_physics_separation.json
    python recipes/benchmarks/bench_physics.py --table-from docs/data/bench_physics_separation.json --failures
    python recipes/benchmarks/bench_physics.py --table-from docs/data/bench_physics_separation.json --criterion-study
    python recipes/benchmarks/bench_physics.py --separation-only --output /tmp/sep.json   # then, per window:
    python recipes/benchmarks/bench_physics.py --table-from /tmp/sep.json \
        --same-as docs/data/bench_physics_separation.json
    python recipes/benchmarks/bench_physics.py --strips-only --strips-dir docs   # the RLPF page's PNG strips
    python recipes/benchmarks/bench_physics.py --floor-rule   # the windows the floor filter drops, and why
    python recipes/benchmarks/bench_physics.py --sweep post_train --sweep-edits --tracking '{"residual_weight": 4}'
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import statistics
import time
import types
from pathlib import Path

import mujoco
import numpy as np
import torch

from diffgrpo.rng import make_generator
from tasks.ego_motion.body.geometry import FOOT_JOINTS
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.physics.criterion import contact_height_m, reference_kinematics
from tasks.ego_motion.physics.dynamics import inverse_dynamics
from tasks.ego_motion.physics.edits import EDITS, sunk_below_contact
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator
from tasks.ego_motion.physics.humanoid import HumanoidConfig, build_humanoid
from tasks.ego_motion.physics.plausibility import plausibility
from tasks.ego_motion.physics.tracking import TrackingConfig, success_criteria, track
from tasks.ego_motion.sampling.sampler import sample_motion
from tasks.ego_motion.task import DEMO_PRIOR_PATH, EgoMotionTask, EgoMotionTaskConfig

FPS = 30.0
SPLITS = ("test", "post_train")
FLOOR_CONTACT_M = 0.15
"""The floor filter the RLPF recipe serves (``--base.task.floor-contact-m``): a foot joint within this of z = 0 in
at least ``EgoMotionTaskConfig.floor_frame_fraction`` (0.9) of the frames."""
EARLIER_FLOOR_CONTACT_M = 0.1
"""The floor filter before ``floor_frame_fraction`` (commit 7fcf2a5): a foot joint within this of z = 0 at one frame
or more."""
SUNK_BELOW_CONTACT = "sunk 5 cm below contact"
"""The separation's extra row: ``edits.sunk_below_contact`` at 5 cm, from each window's own contact height (the literal
"sunk 5 cm" row sinks from z = 0, which returns a capture that floats 5 cm to the floor)."""
FAILING = ("fell", "residual", "pelvis", "planted", "unexecuted")
"""The success criteria ``--sweep`` counts failures of, by the first word ``failed_criteria`` gives them."""


def _best_ms(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best * 1e3


def _windows(task: EgoMotionTask, split: str, limit: int):
    n = min(task.num_examples(split), limit)
    return task.load_examples(split, torch.arange(n)), n


def _unmirrored(task: EgoMotionTask, split: str) -> torch.Tensor:
    """(m,) positions among the split's served windows of those that are not a mirrored copy: one per motion."""
    mirrored = task.windows(split).get(task.kept_windows(split))["mirrored"]
    return torch.nonzero(~mirrored).flatten()


def _rest_joints(task: EgoMotionTask, betas: torch.Tensor) -> torch.Tensor:
    return task.body.shaped_joints(torch.nn.functional.pad(betas, (0, task.body.num_betas - 16)))[:22]


def _humanoid(task: EgoMotionTask, betas: torch.Tensor, cfg: HumanoidConfig | None = None):
    return build_humanoid(_rest_joints(task, betas), cfg)


def _tracking_parts(h, qpos, repeats: int) -> dict[str, float]:
    """Where one tracking run's time goes (ms, the run with the least total of ``repeats``): MuJoCo's simulation steps
    (``mj_step``, ``mj_step1``, ``mj_step2``: 252 per 64-frame motion) and the control updates' ``daqp`` solves, timed
    by handing ``tracking.py`` and ``balance.py`` stand-ins for the ``mujoco`` and ``daqp`` modules that time those
    calls (restored afterwards), and the rest of the run (the controller's Python and its other MuJoCo calls)."""
    from tasks.ego_motion.physics import balance, tracking

    spent = {}

    def timed(fn, part):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[part] += time.perf_counter() - t0
        return call

    mujoco_stand_in = types.ModuleType("mujoco")
    mujoco_stand_in.__dict__.update(vars(mujoco))
    for name in ("mj_step", "mj_step1", "mj_step2"):
        setattr(mujoco_stand_in, name, timed(getattr(mujoco, name), "MuJoCo steps"))
    daqp_stand_in = types.ModuleType("daqp")
    daqp_stand_in.solve = timed(balance.daqp.solve, "daqp solves")
    best: dict[str, float] = {}
    saved = tracking.mujoco, balance.daqp
    tracking.mujoco, balance.daqp = mujoco_stand_in, daqp_stand_in
    try:
        for _ in range(repeats):
            spent.update({"MuJoCo steps": 0.0, "daqp solves": 0.0})
            t0 = time.perf_counter()
            track(h, qpos, FPS)
            total = time.perf_counter() - t0
            if not best or total < best["total"]:
                best = {"total": total, **spent}
    finally:
        tracking.mujoco, balance.daqp = saved
    parts = {f"tracking: {name}": best[name] * 1e3 for name in ("MuJoCo steps", "daqp solves")}
    parts["tracking: the rest"] = (best["total"] - best["MuJoCo steps"] - best["daqp solves"]) * 1e3
    return parts


def _baseline(package: str):
    """(build_humanoid, track, PhysicsEvaluator) of an older checkout's ``tasks`` package, importable under the name
    ``package``: e.g. ``git archive 6bb19d9 tasks | tar -x -C /tmp/baseline && mv /tmp/baseline/tasks
    /tmp/baseline/baseline_tasks``, then ``PYTHONPATH=/tmp/baseline python recipes/benchmarks/bench_physics.py
    --baseline baseline_tasks``."""
    humanoid = importlib.import_module(f"{package}.ego_motion.physics.humanoid")
    tracking = importlib.import_module(f"{package}.ego_motion.physics.tracking")
    evaluator = importlib.import_module(f"{package}.ego_motion.physics.evaluator")
    return humanoid.build_humanoid, tracking.track, evaluator.PhysicsEvaluator


def _interleaved_best_ms(runs: dict, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Per named callable, the best of ``repeats`` runs (ms), the callables taking turns within each repeat, so that
    an A/B pair sees the same load on a shared machine: wall-clock time, and the process's CPU time
    (``time.process_time``: without the time other jobs hold the core, which a loaded machine adds to wall-clock
    time; not without their cache contention)."""
    best, best_cpu = dict.fromkeys(runs, float("inf")), dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
            best_cpu[name] = min(best_cpu[name], time.process_time() - c0)
    return {name: value * 1e3 for name, value in best.items()}, {name: value * 1e3 for name, value in best_cpu.items()}


def speed(task: EgoMotionTask, repeats: int, limit: int, baseline: str | None = None) -> dict:
    """Per stage, the median over the test windows of the best of ``repeats`` (ms); the tracking's parts from one
    instrumented run per window (``_tracking_parts``; medians of parts need not add up). "evaluator, whole motion" is
    ``PhysicsEvaluator.evaluate_one`` with its humanoid cached: the pose conversion, the geoms' poses (computed once,
    shared), inverse dynamics, plausibility and tracking, what a physics reward pays per sample. With ``baseline`` (a
    package name, ``_baseline``), an older checkout's tracker and evaluator on the same windows, taking turns with this
    checkout's within each repeat; "ratios" are medians over windows of the per-window ratio. The load average
    (1 minute) is recorded at the start and the end."""
    load_start = os.getloadavg()[0]
    batch, n = _windows(task, "test", limit)
    stages: dict[str, list[float]] = {"build": [], "inverse_dynamics": [], "plausibility": [], "tracking": [],
                                      "tracking: MuJoCo steps": [], "tracking: daqp solves": [],
                                      "tracking: the rest": [], "evaluator, whole motion": []}
    cpu_stages: dict[str, list[float]] = {}  # the side-by-side runs' CPU times
    evaluator = PhysicsEvaluator(task.body)
    if baseline is not None:
        baseline_build, baseline_track, baseline_evaluator_class = _baseline(baseline)
        baseline_evaluator = baseline_evaluator_class(task.body)
        stages["baseline tracking"], stages["baseline evaluator, whole motion"] = [], []
    for i in range(n):
        rest = _rest_joints(task, batch["betas"][i])
        motion = (batch["T_world_root"][i], batch["body_rotmats"][i], batch["betas"][i])
        stages["build"].append(_best_ms(lambda rest=rest: build_humanoid(rest), repeats))
        h = build_humanoid(rest)
        qpos = h.qpos(batch["T_world_root"][i], batch["body_rotmats"][i])
        stages["inverse_dynamics"].append(_best_ms(lambda h=h, q=qpos: inverse_dynamics(h, q, FPS), repeats))
        stages["plausibility"].append(_best_ms(lambda h=h, q=qpos: plausibility(h, q), repeats))
        for name, ms in _tracking_parts(h, qpos, repeats).items():
            stages[name].append(ms)
        runs = {"tracking": lambda h=h, q=qpos: track(h, q, FPS),
                "evaluator, whole motion": lambda m=motion: evaluator.evaluate_one(*m)}
        evaluator.evaluate_one(*motion)  # compiles and caches the humanoid of these betas
        if baseline is not None:
            hb = baseline_build(rest)
            qb = hb.qpos(batch["T_world_root"][i], batch["body_rotmats"][i])
            runs.update({"baseline tracking": lambda h=hb, q=qb: baseline_track(h, q, FPS),
                         "baseline evaluator, whole motion": lambda m=motion: baseline_evaluator.evaluate_one(*m)})
            baseline_evaluator.evaluate_one(*motion)
        wall, cpu = _interleaved_best_ms(runs, repeats)
        for name, ms in wall.items():
            stages[name].append(ms)
        for name, ms in cpu.items():
            cpu_stages.setdefault(name, []).append(ms)
    medians = {k: statistics.median(v) for k, v in stages.items()}
    medians["total, cached humanoid"] = medians["inverse_dynamics"] + medians["plausibility"] + medians["tracking"]
    result = {"motions": n, "frames": int(batch["T_world_root"].shape[1]), "repeats": repeats, "median_ms": medians,
              "load_average": {"start": load_start, "end": os.getloadavg()[0]}}
    result["cpu_median_ms"] = {k: statistics.median(v) for k, v in cpu_stages.items()}
    if baseline is not None:
        for key, times in (("ratios", stages), ("cpu_ratios", cpu_stages)):
            result[key] = {f"{name} / baseline {name}": statistics.median(
                a / b for a, b in zip(times[name], times[f"baseline {name}"], strict=True))
                for name in ("tracking", "evaluator, whole motion")}
    return result


def sweep(task: EgoMotionTask, split: str, tracking: TrackingConfig, humanoid: HumanoidConfig,
          baseline: str | None = None, edits: bool = False) -> dict:
    """The ground truth alone of every unmirrored floor-contact window of ``split`` (one per motion: a mirrored copy
    gives the same result) under one tracker configuration: how the defaults were chosen (on post_train). Means, the
    count of motions failing each criterion, the residual's quantiles over motions, the median and 90 % quantile of
    the mean joint position error (mm) and the median pelvis rise (cm), ms per motion. With ``edits``, also how many
    of the motions each edit of the separation (``EDITS`` and ``SUNK_BELOW_CONTACT``) executes under the same
    configuration. With ``baseline`` (a package name, ``_baseline``), an older checkout's tracker at its own defaults
    instead.

    Raises ValueError if ``baseline`` is given with ``tracking`` or ``humanoid`` other than the defaults (the older
    tracker has its own configuration classes; overrides would not apply to it)."""
    if baseline is not None and (tracking != TrackingConfig() or humanoid != HumanoidConfig()):
        raise ValueError(f"--baseline {baseline} runs the older tracker at its own defaults: --tracking / --humanoid "
                         "overrides cannot apply to it; drop them, or drop --baseline to sweep the current tracker.")
    positions = _unmirrored(task, split)
    batch, n = task.load_examples(split, positions), len(positions)
    build, run = (build_humanoid, lambda h, q: track(h, q, FPS, tracking)) if baseline is None else (
        lambda rest, _: _baseline(baseline)[0](rest), lambda h, q: _baseline(baseline)[1](h, q, FPS))
    rows, edited = [], {}
    for i in range(n):
        h = build(_rest_joints(task, batch["betas"][i]), humanoid)
        motion = (batch["T_world_root"][i], batch["body_rotmats"][i])
        qpos = h.qpos(*motion)
        t0 = time.perf_counter()
        tr = run(h, qpos)
        rows.append((tr.success, tr.survival, tr.assist_n / h.weight_n, (time.perf_counter() - t0) * 1e3,
                     failed_criteria(tr, h.weight_n, tracking), tr.tracking_error_m, tr.pelvis_rise_m))
        if edits:
            contact = contact_height_m(reference_kinematics(h, qpos)[1])
            for name, edit in {**EDITS, SUNK_BELOW_CONTACT: lambda root, rotmats, c=contact:
                               sunk_below_contact(root, rotmats, c)}.items():
                edited[name] = edited.get(name, 0) + int(run(h, h.qpos(*edit(*motion))).success)
    success, survival, residual, ms, failed, error, rise = zip(*rows, strict=True)
    result = {"split": split, "motions": n, "success": float(np.mean(success)), "survival": float(np.mean(survival)),
              "residual_per_weight": float(np.mean(residual)), "ms_per_motion": float(np.median(ms)),
              "failing": {k: sum(any(f.startswith(k) for f in fs) for fs in failed) for k in FAILING},
              "residual_quantiles": {f"q{int(q * 100)}": float(np.quantile(residual, q)) for q in (0.5, 0.9, 1.0)},
              "tracking_error_mm": {q: float(np.quantile(error, v)) * 1e3 for q, v in (("q50", 0.5), ("q90", 0.9))},
              "pelvis_rise_cm_q50": float(np.nanmedian(rise)) * 1e2}
    if edits:
        result["edits_executed"] = edited
    return result


def _touching_counts(task: EgoMotionTask, split: str) -> dict:
    """How many of the split's windows the floor filter keeps, against the earlier definition (a foot joint within
    0.1 m of z = 0 at one frame or more), for the docs' honest count."""
    feet_z = task.windows(split).get(torch.arange(len(task.windows(split))))["joints_world"][:, :, list(FOOT_JOINTS), 2]
    return {"all_windows": int(feet_z.shape[0]), "touching_at_some_frame": int((feet_z.amin(dim=(1, 2)) <= 0.1).sum()),
            "on_the_floor": task.num_examples(split)}


def floor_rule(task: EgoMotionTask, split: str) -> dict:
    """The windows of ``split`` the earlier floor filter (``EARLIER_FLOOR_CONTACT_M`` at one frame or more) keeps and
    the current one (``task.cfg``) drops ("dropped": index into ``windows(split)``, clip, mirrored, the fraction of
    frames whose lowest foot joint is within ``task.cfg.floor_contact_m`` of z = 0, and the current tracker's
    ground-truth success, None for a mirrored copy, not simulated); the lowest such fraction among the windows kept;
    and the count of windows the current filter keeps that the earlier one did not."""
    windows = task.windows(split)
    everything = windows.get(torch.arange(len(windows)))
    lowest = everything["joints_world"][:, :, list(FOOT_JOINTS), 2].amin(dim=2)  # (N, T)
    fraction = (lowest <= task.cfg.floor_contact_m).double().mean(dim=1)
    earlier = torch.nonzero(lowest.amin(dim=1) <= EARLIER_FLOOR_CONTACT_M).flatten().tolist()
    dropped = sorted(set(earlier) - set(task.kept_windows(split).tolist()))
    names = windows.sequence_names(dropped)
    rows = []
    for i, name in zip(dropped, names, strict=True):
        success = None
        if not bool(everything["mirrored"][i]):
            h = _humanoid(task, everything["betas"][i])
            success = bool(track(h, h.qpos(everything["T_world_root"][i], everything["body_rotmats"][i]), FPS).success)
        rows.append({"window": i, "sequence": name, "mirrored": bool(everything["mirrored"][i]),
                     "floor_frame_fraction": float(fraction[i]), "success": success})
    kept = task.kept_windows(split)
    return {"dropped": rows, "lowest_kept_fraction": float(fraction[kept].min()),
            "kept_not_earlier": len(set(kept.tolist()) - set(earlier))}


def separation(task: EgoMotionTask, split: str, limit: int) -> dict:
    """Per motion kind (ground truth, each edit): the mean of each measure over the split's windows; and per window,
    the ground truth's outcome and the criterion it failed (the docs' failure diagnosis), whether it is a mirrored
    copy, and every kind's success measures (``kinds``: what ``criterion_study`` recounts)."""
    batch, n = _windows(task, split, limit)
    names = task.windows(split).sequence_names(task.kept_windows(split)[:n].tolist())
    mirrored = task.windows(split).get(task.kept_windows(split)[:n])["mirrored"]
    rows: dict[str, dict[str, list[float]]] = {}
    windows = []
    for i in range(n):
        h = _humanoid(task, batch["betas"][i])
        motion = (batch["T_world_root"][i], batch["body_rotmats"][i])
        contact = contact_height_m(reference_kinematics(h, h.qpos(*motion))[1])
        edits = {**EDITS, SUNK_BELOW_CONTACT: lambda root, rotmats, c=contact: sunk_below_contact(root, rotmats, c)}
        kinds = {}
        for name, edit in {"ground truth": None, **edits}.items():
            qpos = h.qpos(*(motion if edit is None else edit(*motion)))
            tr = track(h, qpos, FPS)
            row = rows.setdefault(name, {"success": [], "survival": [], "tracking_residual_per_weight": [],
                                         "residual_force_per_weight": [], "planted_foot_speed_m_per_s": [],
                                         "unexecuted_speed_m_per_s": []})
            row["success"].append(float(tr.success))
            row["survival"].append(tr.survival)
            row["tracking_residual_per_weight"].append(tr.assist_n / h.weight_n)
            row["planted_foot_speed_m_per_s"].append(tr.planted_foot_speed_m_per_s)
            row["unexecuted_speed_m_per_s"].append(tr.unexecuted_speed_m_per_s)
            needed = inverse_dynamics(h, qpos, FPS).residual_force_n / h.weight_n  # (T,)
            row["residual_force_per_weight"].append(float(needed.mean()))
            kinds[name] = {"success": bool(tr.success), "survival": tr.survival, "pelvis_rise_m": tr.pelvis_rise_m,
                           "residual_per_weight": tr.assist_n / h.weight_n,
                           "planted_foot_speed_m_per_s": tr.planted_foot_speed_m_per_s,
                           "unexecuted_speed_m_per_s": tr.unexecuted_speed_m_per_s}
            if edit is None:
                speed = float((motion[0][1:, :2, 3] - motion[0][:-1, :2, 3]).norm(dim=-1).mean()) * FPS
                net = float((motion[0][-1, :2, 3] - motion[0][0, :2, 3]).norm()) * FPS / (len(motion[0]) - 1)
                windows.append({"window": i, "sequence": names[i], "mirrored": bool(mirrored[i]),
                                "success": bool(tr.success),
                                "survival": tr.survival, "residual_per_weight": tr.assist_n / h.weight_n,
                                "inverse_dynamics_residual_per_weight": float(needed.mean()),
                                "inverse_dynamics_residual_max_per_weight": float(needed.max()),
                                "pelvis_speed_m_per_s": speed, "pelvis_net_speed_m_per_s": net,
                                "pelvis_rise_m": tr.pelvis_rise_m, "contact_height_m": contact,
                                "planted_foot_speed_m_per_s": tr.planted_foot_speed_m_per_s,
                                "unexecuted_speed_m_per_s": tr.unexecuted_speed_m_per_s,
                                "failed": failed_criteria(tr, h.weight_n)})
        windows[-1]["kinds"] = kinds
    truth = np.array(rows["ground truth"]["tracking_residual_per_weight"])
    return {"windows": n, "motions": len(_unmirrored(task, split)),
            "rows": {name: {k: statistics.mean(v) for k, v in row.items()} for name, row in rows.items()},
            "floor_filter": _touching_counts(task, split), "ground_truth_windows": windows,
            "ground_truth_residual_quantiles": {f"q{int(q * 100)}": float(np.quantile(truth, q))
                                                for q in (0.1, 0.5, 0.9, 1.0)}}


def failed_criteria(tr, weight_n: float, cfg: TrackingConfig | None = None) -> list[str]:
    """The success criteria (``TrackingConfig``) a tracking result misses, in words."""
    cfg, T = cfg or TrackingConfig(), len(tr.residual_force_n)
    failed = []
    if tr.survival < 1:
        failed.append(f"fell at frame {round(tr.survival * T)}")
    if tr.assist_n / weight_n > cfg.max_residual_per_weight:
        failed.append(f"residual {tr.assist_n / weight_n:.3f} m g")
    if tr.pelvis_rise_m > cfg.max_pelvis_rise_m:
        failed.append(f"pelvis rise {tr.pelvis_rise_m * 100:.1f} cm")
    if tr.planted_foot_speed_m_per_s > cfg.max_planted_foot_speed_m_per_s:
        failed.append(f"planted feet slide {tr.planted_foot_speed_m_per_s:.2f} m/s")
    if tr.unexecuted_speed_m_per_s > cfg.max_unexecuted_speed_m_per_s:
        failed.append(f"unexecuted motion {tr.unexecuted_speed_m_per_s:.2f} m/s")
    return failed


STRIP_PRIOR_SEEDS = 10
"""The strips' prior sample is the first of this many seeds whose sample the humanoid cannot execute to the end."""
STRIP_WINDOW = 18
"""The floor-contact test window the strips show (clip 007_02, a walk, which the tracker executes)."""


def strips(task: EgoMotionTask, out_dir: Path) -> list[Path]:
    """PNG strips of reference (blue) vs simulated humanoid (orange): a test window's ground truth, the same window
    leaned 0 -> 60 deg (which the humanoid cannot follow: it falls behind and the run stops), and the shipped prior's
    sample for its head trajectory that falls (``STRIP_PRIOR_SEEDS``)."""
    from tasks.ego_motion.evaluation.render import render_frames_png

    batch = task.load_examples("test", torch.tensor([STRIP_WINDOW]))
    h = _humanoid(task, batch["betas"][0])
    motion = (batch["T_world_root"][0], batch["body_rotmats"][0])
    paths = []
    for name, edit in (("ground_truth", None), ("leaned", EDITS["leaned 0->60 deg"])):
        root, rotmats = motion if edit is None else edit(*motion)
        qpos = h.qpos(root, rotmats)
        tr = track(h, qpos, FPS)
        joints = task.body.forward_kinematics(rotmats, betas=torch.nn.functional.pad(
            batch["betas"][0], (0, task.body.num_betas - 16)), T_world_root=root).t_world_joint[:, :22]
        title = (f"test window {STRIP_WINDOW}, {name.replace('_', ' ')}: success {tr.success}, survival "
                 f"{tr.survival:.2f}, residual {tr.assist_n / h.weight_n:.3f} m g")
        paths.append(render_frames_png(out_dir / f"ego_motion_rlpf_tracker_{name}.png", joints, tr.simulated_joints,
                                       title=title, gt_label="reference", pred_label="simulated"))
    # the shipped prior's sample for the same head trajectory: the first of the seeds 0, 1, ... whose sample falls
    model = load_denoiser(DEMO_PRIOR_PATH)
    for seed in range(STRIP_PRIOR_SEEDS):
        trajectory = sample_motion(task, model, batch, generator=make_generator(seed, "strip", STRIP_WINDOW))
        decoded = task.decode(trajectory.samples, batch)
        h = _humanoid(task, decoded["betas"][0])
        tr = track(h, h.qpos(decoded["T_world_root"][0], decoded["body_rotmats"][0]), FPS)
        if tr.survival < 1:
            title = (f"test window {STRIP_WINDOW}, the prior's sample (seed {seed}): success {tr.success}, survival "
                     f"{tr.survival:.2f}, residual {tr.assist_n / h.weight_n:.3f} m g")
            paths.append(render_frames_png(out_dir / "ego_motion_rlpf_tracker_prior_sample.png",
                                           decoded["joints_world"][0, :, :22], tr.simulated_joints, title=title,
                                           gt_label="prior sample (reference)", pred_label="simulated"))
            break
    return paths


def table(result: dict) -> str:
    """The speed table (when ``result`` has one: not with ``--separation-only``) with the side-by-side ratios and the
    load average where recorded, and each split's separation table; the planted-foot and unexecuted-motion columns show
    "—" in results that predate them."""
    text = ""
    if "median_ms" in result:
        rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in result["median_ms"].items())
        load = result.get("load_average")  # absent in results that predate it
        load = f", load average {load['start']:.1f} at the start and {load['end']:.1f} at the end" if load else ""
        text = (f"{result['motions']} floor-contact test windows of {result['frames']} frames, best of "
                f"{result['repeats']}, median over windows, 1 thread{load}.\n\n| stage | ms per motion |\n|---|---:|\n"
                f"{rows}\n")
        if "cpu_median_ms" in result:  # absent in results that predate it
            rows = "\n".join(f"| {k} | {v:.1f} |" for k, v in result["cpu_median_ms"].items())
            text += f"\n| side by side, CPU time of the process | ms per motion |\n|---|---:|\n{rows}\n"
        if "ratios" in result:
            cpu = result.get("cpu_ratios", {})
            ratios = "\n".join(f"| {k} | {v:.3f} | {cpu[k]:.3f} |" if k in cpu else f"| {k} | {v:.3f} | — |"
                                for k, v in result["ratios"].items())
            text += (f"\n| side by side, median over windows of the per-window ratio | wall clock | CPU time |\n"
                     f"|---|---:|---:|\n{ratios}\n")
    for split, sep in result.get("separation", {}).items():  # absent with --speed-only
        checks = "\n".join(f"| {name} | {_count(v['success'], sep)} | {v['survival']:.2f} | "
                           f"{v['tracking_residual_per_weight']:.3f} | {v['residual_force_per_weight']:.2f} | "
                           f"{_number(v.get('planted_foot_speed_m_per_s'))} | "
                           f"{_number(v.get('unexecuted_speed_m_per_s'))} |"
                           for name, v in sep["rows"].items())
        counts = sep["floor_filter"]
        quantiles = ", ".join(f"{k} {v:.3f}" for k, v in sep["ground_truth_residual_quantiles"].items())
        motions = f", {sep['motions']} motions" if "motions" in sep else ""
        text += (f"\nSeparation on the {sep['windows']} floor-contact {split} windows{motions} (of "
                 f"{counts['all_windows']}; "
                 f"{counts['touching_at_some_frame']} touch the floor at some frame), means:\n\n| motion | tracking "
                 f"success | survival | tracker residual / (m g) | inverse-dynamics residual / (m g) | planted feet's "
                 f"speed (m/s) | unexecuted motion (m/s) |\n"
                 f"|---|---:|---:|---:|---:|---:|---:|\n{checks}\n\nGround truth's tracker residual / (m g) over "
                 f"windows: {quantiles}.\n")
    return text


def _count(success: float, sep: dict) -> str:
    """A success rate with its count of motions where the split's windows are motions plus mirrors (post_train:
    twice as many windows as motions, each executed like its mirror), of windows otherwise."""
    windows, motions = sep["windows"], sep.get("motions", sep["windows"])
    per = "motions" if motions != windows else "windows"
    return f"{success:.2f} ({round(success * motions)} of {motions} {per})"


def separation_changes(result: dict, other: dict) -> str:
    """How two separation results differ per window (e.g. a revision meant to be faster, not different, against the
    docs' results file): the (split, window, kind) whose success differs, and the largest differences of the tracker's
    residual and survival over every window and kind. Raises ValueError if their windows are not the same."""
    flips, residual, survival = [], 0.0, 0.0
    for split, sep in result["separation"].items():
        mine, theirs = sep["ground_truth_windows"], other["separation"][split]["ground_truth_windows"]
        if [w["window"] for w in mine] != [w["window"] for w in theirs]:
            raise ValueError(f"the two results hold different {split} windows; compare results of the same windows.")
        for w, v in zip(mine, theirs, strict=True):
            for kind, a in w["kinds"].items():
                b = v["kinds"][kind]
                if a["success"] != b["success"]:
                    flips.append(f"{split} window {w['window']} ({w['sequence']}), {kind}: {b['success']} -> "
                                 f"{a['success']}")
                residual = max(residual, abs(a["residual_per_weight"] - b["residual_per_weight"]))
                survival = max(survival, abs(a["survival"] - b["survival"]))
    count = sum(len(sep["ground_truth_windows"]) * len(sep["rows"]) for sep in result["separation"].values())
    return (f"{len(flips)} of {count} (window, kind) runs change success"
            + "".join(f"\n- {flip}" for flip in flips)
            + f"\nlargest change of the tracker residual {residual:.4f} m g, of survival {survival:.4f}\n")


def _number(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def failures(result: dict) -> str:
    """The ground-truth windows that fail, with the criterion and the clip (the docs' diagnosis table). Pelvis speed:
    "path" is the mean frame-to-frame horizontal speed (capture jitter inflates it), "net" the horizontal
    displacement from the first to the last frame over the window's duration ("—" in results that predate it)."""
    lines = ["| split | window | clip | survival | residual / (m g) | pelvis rise (cm) | inverse-dynamics residual, "
             "mean / max (m g) | pelvis speed (m/s): path / net | failed |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for split, sep in result["separation"].items():
        for w in sep["ground_truth_windows"]:
            if not w["success"]:
                lines.append(f"| {split} | {w['window']} | {w['sequence']} | {w['survival']:.2f} | "
                             f"{w['residual_per_weight']:.3f} | {w['pelvis_rise_m'] * 100:.1f} | "
                             f"{w['inverse_dynamics_residual_per_weight']:.2f} / "
                             f"{w['inverse_dynamics_residual_max_per_weight']:.2f} | {w['pelvis_speed_m_per_s']:.2f} / "
                             f"{_number(w.get('pelvis_net_speed_m_per_s'))} | "
                             f"{'; '.join(w['failed'])} |")
    return "\n".join(lines) + "\n"


def edit_successes(result: dict) -> str:
    """The edited windows that succeed, with the ground truth's contact height (how far its feet float above z = 0:
    a capture floating 5 cm is sunk by "sunk 5 cm" back to the floor) and the edit's criteria measures. Results that
    predate the per-window ``kinds`` give no rows."""
    lines = ["| split | window | clip | edit | ground truth's contact height (cm) | pelvis rise (cm) | "
             "residual / (m g) | planted feet's speed (m/s) | unexecuted motion (m/s) |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|"]
    for split, sep in result["separation"].items():
        for w in sep["ground_truth_windows"]:
            for name, e in w.get("kinds", {}).items():
                if name == "ground truth" or not e["success"]:
                    continue
                lines.append(f"| {split} | {w['window']} | {w['sequence']} | {name} | "
                             f"{w['contact_height_m'] * 100:.1f} | {e['pelvis_rise_m'] * 100:.1f} | "
                             f"{e['residual_per_weight']:.3f} | {e['planted_foot_speed_m_per_s']:.2f} | "
                             f"{e['unexecuted_speed_m_per_s']:.2f} |")
    return "\n".join(lines) + "\n"


STUDY_RESIDUAL_BOUNDS = (0.1, 0.12, 0.15, 0.2, 0.3, 1.0)
"""The residual bounds (/ m g) ``criterion_study`` recounts successes at."""


def _succeeds(m: dict, cfg: TrackingConfig, max_residual_per_weight: float | None = None) -> bool:
    """Success from one run's recorded measures (``separation``'s per-window ``kinds``) under ``cfg``'s criterion:
    the thresholds only decide success, not the simulation, so they can be recounted without simulating again."""
    if max_residual_per_weight is not None:
        cfg = dataclasses.replace(cfg, max_residual_per_weight=max_residual_per_weight)
    criteria = success_criteria(cfg, m["residual_per_weight"], m["pelvis_rise_m"], m["planted_foot_speed_m_per_s"],
                                m["unexecuted_speed_m_per_s"])
    return m["survival"] == 1.0 and all(measure <= bound for measure, bound in criteria)


def criterion_study(result: dict, split: str = "post_train") -> str:
    """How the success criterion's thresholds were chosen, from a ``separation`` result (one window per motion: the
    unmirrored ones): per motion kind, the range over motions of the planted feet's speed and of the unexecuted
    motion, over all motions and over those that pass every other criterion (survival, residual, pelvis rise); and the
    motions that succeed at other residual bounds. Raises ValueError for results that predate the per-window
    ``kinds``, or if a recount at the defaults disagrees with a recorded success (the defaults changed since)."""
    cfg = TrackingConfig()
    windows = [w for w in result["separation"][split]["ground_truth_windows"] if not w.get("mirrored", False)]
    if not windows or "kinds" not in windows[0]:
        raise ValueError("--criterion-study needs a result written by --separation-only from this revision on "
                         "(per-window 'kinds').")
    kinds = list(windows[0]["kinds"])
    for w in windows:
        for name, m in w["kinds"].items():
            if _succeeds(m, cfg) != m["success"]:
                raise ValueError(f"window {w['window']} {name}: recorded success {m['success']} differs from the "
                                 "current TrackingConfig's criterion; rerun --separation-only.")
    others = dataclasses.replace(cfg, max_planted_foot_speed_m_per_s=1e9, max_unexecuted_speed_m_per_s=1e9)  # off
    lines = [f"{split}, {len(windows)} motions (unmirrored windows). Range over motions (min - max):", "",
             "| motion | motions passing the other criteria | planted feet's speed, all (m/s) | the same, passing "
             "the other criteria | unexecuted motion, all (m/s) | the same, passing the other criteria |",
             "|---|---:|---:|---:|---:|---:|"]

    def span(values: list[float]) -> str:
        return f"{min(values):.3f} - {max(values):.3f}" if values else "—"

    for name in kinds:
        ms = [w["kinds"][name] for w in windows]
        passing = [m for m in ms if _succeeds(m, others)]
        lines.append(f"| {name} | {len(passing)} | {span([m['planted_foot_speed_m_per_s'] for m in ms])} | "
                     f"{span([m['planted_foot_speed_m_per_s'] for m in passing])} | "
                     f"{span([m['unexecuted_speed_m_per_s'] for m in ms])} | "
                     f"{span([m['unexecuted_speed_m_per_s'] for m in passing])} |")
    lines += ["", "Motions that succeed at other residual bounds (the other thresholds at their defaults):", "",
              "| residual bound / (m g) | " + " | ".join(kinds) + " |", "|---:|" + "---:|" * len(kinds)]
    for bound in STUDY_RESIDUAL_BOUNDS:
        counts = [sum(_succeeds(w["kinds"][name], cfg, bound) for w in windows) for name in kinds]
        lines.append(f"| {bound:g} | " + " | ".join(str(c) for c in counts) + " |")
    return "\n".join(lines) + "\n"


def sweep_table(records: list[dict]) -> str:
    """The docs' table of ``--sweep`` results: records {"tracking": {...}, "humanoid": {...}, "result": {...}}, or
    {"label": ..., "result": {...}} for a baseline."""
    detailed = all("residual_quantiles" in record["result"] for record in records)  # records from sweep's later form
    edits = detailed and all("edits_executed" in record["result"] for record in records)
    extra = (" residual q50 / q90 / max | joint error q50 / q90 (mm) | pelvis rise q50 (cm) |" if detailed else "") + (
        f" edits executed: {' / '.join(EDITS)} / {SUNK_BELOW_CONTACT} |" if edits else "")
    lines = ["| change from the defaults | success | survival | residual / (m g) | failing: fell / residual / "
             f"pelvis rise / planted feet / unexecuted | ms per motion |{extra}",
             "|---|---:|---:|---:|---:|---:|" + "---:|" * (detailed * 3 + edits)]
    for record in records:
        change = record.get("label") or ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in
                                                  {**record["humanoid"], **record["tracking"]}.items())
        change = change or "none (the defaults)"
        r = record["result"]
        if detailed and len({record["result"]["split"] for record in records}) > 1:  # both splits: say which
            change = f"{r['split']}: {change}"
        failing = " / ".join(str(r["failing"].get(k, "—")) for k in FAILING)  # "—": a record before the criterion
        line = (f"| {change} | {r['success']:.3f} | {r['survival']:.3f} | {r['residual_per_weight']:.3f} | "
                f"{failing} | {r['ms_per_motion']:.0f} |")
        if detailed:
            q, error = r["residual_quantiles"], r["tracking_error_mm"]
            line += (f" {q['q50']:.3f} / {q['q90']:.3f} / {q['q100']:.3f} | {error['q50']:.1f} / {error['q90']:.1f} | "
                     f"{r['pelvis_rise_cm_q50']:.2f} |")
        if edits:
            line += " " + " / ".join(str(r["edits_executed"][name]) for name in (*EDITS, SUNK_BELOW_CONTACT)) + " |"
        lines.append(line)
    if all("motions" in record["result"] for record in records):
        note = "Failing counts are of motions (the unmirrored windows)."
    else:  # records from before --sweep ran one window per motion
        note = ("Failing counts are of windows where a record predates one window per motion: on post_train each "
                "motion with its mirror (even counts); test windows are not mirrored.")
    return "\n".join(lines) + f"\n\n{note}\n"


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--limit", type=int, default=1000, help="at most this many windows per split")
    parser.add_argument("--output", type=Path, default=None, help="write the result as JSON here")
    parser.add_argument("--table-from", type=Path, default=None,
                        help="print the tables of this JSON result only (a list: --sweep records)")
    parser.add_argument("--strips-dir", type=Path, default=None, help="also write the reference-vs-simulated PNGs here")
    parser.add_argument("--failures", action="store_true", help="with --table-from: also the failing windows")
    parser.add_argument("--criterion-study", action="store_true",
                        help="with --table-from a --separation-only result: how the criterion's thresholds were "
                             "chosen (post_train motions only)")
    parser.add_argument("--same-as", type=Path, default=None,
                        help="with --table-from a separation result: the windows whose success differs from this "
                             "other separation result's, instead of the tables")
    parser.add_argument("--strips-only", action="store_true", help="write the PNGs (--strips-dir) and stop")
    parser.add_argument("--baseline", default=None,
                        help="package name of an older checkout's tasks on PYTHONPATH: its tracker side by side "
                             "(see _baseline)")
    parser.add_argument("--sweep", choices=SPLITS, default=None,
                        help="only the ground truth of this split under --tracking / --humanoid overrides, and stop")
    parser.add_argument("--sweep-edits", action="store_true",
                        help="with --sweep: also count the motions whose edits (the separation's) are executed")
    parser.add_argument("--tracking", type=json.loads, default={},
                        help='TrackingConfig overrides, JSON: {"control_hz": 120}')
    parser.add_argument("--humanoid", type=json.loads, default={}, help='HumanoidConfig overrides, JSON')
    parser.add_argument("--separation-only", action="store_true",
                        help="the separation alone (no speed table): the success criterion's results")
    parser.add_argument("--speed-only", action="store_true",
                        help="the speed table alone (no separation): the evaluator's cost per motion")
    parser.add_argument("--floor-rule", action="store_true",
                        help="only the windows the earlier floor filter keeps and the current one drops, and stop")
    args = parser.parse_args()
    if args.sweep_edits and args.sweep is None:
        parser.error("--sweep-edits counts edits of a --sweep: add --sweep SPLIT.")
    if (args.tracking or args.humanoid) and (args.sweep is None or args.baseline is not None):
        parser.error("--tracking / --humanoid apply to --sweep of the current tracker only: add --sweep SPLIT, and "
                     "drop --baseline (the older tracker runs at its own defaults).")
    if args.table_from is not None:
        loaded = json.loads(args.table_from.read_text())
        if isinstance(loaded, list):  # --sweep records
            print(sweep_table(loaded))
        elif args.same_as is not None:
            print(separation_changes(loaded, json.loads(args.same_as.read_text())))
        elif args.criterion_study:
            print(criterion_study(loaded))
        else:
            print(table(loaded) + ("\n" + failures(loaded) + "\n" + edit_successes(loaded) if args.failures else ""))
        raise SystemExit(0)
    torch.set_num_threads(1)
    task = EgoMotionTask(dataclasses.replace(EgoMotionTaskConfig(), floor_contact_m=FLOOR_CONTACT_M))
    if args.floor_rule:
        print(json.dumps({split: floor_rule(task, split) for split in SPLITS}, indent=1))
        raise SystemExit(0)
    if args.sweep is not None:
        print(json.dumps(sweep(task, args.sweep, TrackingConfig(**args.tracking), HumanoidConfig(**args.humanoid),
                               args.baseline, args.sweep_edits)))
        raise SystemExit(0)
    if args.strips_dir is not None:
        print("\n".join(str(p) for p in strips(task, args.strips_dir)))
    if args.strips_only:
        raise SystemExit(0)
    if args.separation_only and args.speed_only:
        parser.error("--separation-only and --speed-only exclude each other; drop one (neither: both parts).")
    result = {} if args.separation_only else speed(task, args.repeats, args.limit, args.baseline)
    if not args.speed_only:
        result["separation"] = {split: separation(task, split, args.limit) for split in SPLITS}
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2))
    print(table(result))
