"""Why the prior's samples fail RLPF's success criterion: per criterion, how many samples miss it.

The prior (``--prior``, default the shipped demo prior) samples ``--noises`` motions per floor-contact window of
``--split`` (the unmirrored windows; the RLPF recipe's floor rule, ``floor_contact_m = 0.15``) with the chain GRPO
rolls out (K = ``--steps``), and the balancing tracker (``physics/tracking.py``) runs each. For every sample it
records the outcome, the criterion's measures and the criteria it misses (``bench_physics.failed_criteria``);
the summary counts samples per missed criterion. It reads no test window unless asked (``--split test``).
Run it as a module (it imports ``recipes.benchmarks.bench_physics``):

    python -m recipes.benchmarks.rlpf_prior_failures --output docs/data/rlpf_prior_failures_post_train.json
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import statistics
from pathlib import Path

import torch

import tasks.ego_motion.grpo as ego
from diffgrpo.rng import make_generator
from recipes.benchmarks.bench_physics import failed_criteria
from tasks.ego_motion.data.windows import TARGET_FPS
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator
from tasks.ego_motion.physics.tracking import TrackingConfig, track
from tasks.ego_motion.sampling.sampler import sample_motion
from tasks.ego_motion.task import EgoMotionTask


def prior_failures(split: str, noises: int, steps: int, prior: Path | None, seed: int) -> dict:
    """Per-sample outcomes and per-criterion failure counts of the prior's samples (module doc)."""
    cfg = ego.Config()
    task = EgoMotionTask(dataclasses.replace(cfg.task, floor_contact_m=0.15))
    model = load_denoiser(prior or cfg.prior)
    windows = torch.arange(0, task.num_examples(split), 2)  # each motion once: its mirror follows it
    batch = task.load_examples(split, windows)
    humanoids = PhysicsEvaluator(task.body).humanoids
    tracking = TrackingConfig()
    samples = []
    for noise in range(noises):
        trajectory = sample_motion(task, model, batch, generator=make_generator(seed, "prior_failures", noise),
                                   chain=task.sampling_chain(steps))
        decoded = task.decode(trajectory.samples, batch)
        for i, window in enumerate(windows.tolist()):
            humanoid = humanoids(decoded["betas"][i])
            result = track(humanoid, humanoid.qpos(decoded["T_world_root"][i], decoded["body_rotmats"][i]),
                           TARGET_FPS, tracking)
            samples.append({"window": window, "noise": noise, "success": result.success,
                            "survival": result.survival, "residual_per_weight": result.assist_n / humanoid.weight_n,
                            "pelvis_rise_m": result.pelvis_rise_m,
                            "planted_foot_speed_m_per_s": result.planted_foot_speed_m_per_s,
                            "unexecuted_speed_m_per_s": result.unexecuted_speed_m_per_s,
                            "failed": failed_criteria(result, humanoid.weight_n, tracking)})
    missed = collections.Counter(name for s in samples for name in {f.split(" ")[0] for f in s["failed"]})
    return {"split": split, "noises": noises, "rollout_steps": steps, "samples": samples,
            "success": sum(s["success"] for s in samples) / len(samples),
            "missed_by_first_word": dict(missed),
            "planted_foot_speed_median": statistics.median(s["planted_foot_speed_m_per_s"] for s in samples)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="post_train")
    parser.add_argument("--noises", type=int, default=2, help="samples per window")
    parser.add_argument("--steps", type=int, default=10, help="rollout steps K (the RLPF recipe's)")
    parser.add_argument("--prior", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = prior_failures(args.split, args.noises, args.steps, args.prior, args.seed)
    print(f"{args.split}: {len(result['samples'])} samples, success {result['success']:.3f}, planted-foot speed "
          f"median {result['planted_foot_speed_median']:.2f} m/s; samples missing each criterion (by its first word): "
          f"{result['missed_by_first_word']}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
