"""Why the prior's samples fail RLPF's success criterion: per criterion, how many samples miss it.

The prior (``--prior``, default the shipped demo prior) samples ``--noises`` motions per floor-contact window of
``--split`` (the unmirrored windows; the RLPF recipe's floor rule, ``floor_contact_m = 0.15``) with the chain GRPO
rolls out (K = ``--steps``), and the balancing tracker (``physics/tracking.py``) runs each. For every sample it
records the outcome, the criterion's measures and the criteria it misses (``bench_physics.failed_criteria``);
the summary counts samples per missed criterion. It reads no test window unless asked (``--split test``).
With ``--refine tto`` each sample is first refined by the paper's test-time optimisation (``sampler.refine_decoded``,
as ``recipes/rlpf_ego_motion.py --rewards.refine tto`` scores it).
Run it as a module (it imports ``recipes.benchmarks.bench_physics``):

    python -m recipes.benchmarks.rlpf_prior_failures --output docs/data/rlpf_prior_failures_post_train.json
    python -m recipes.benchmarks.rlpf_prior_failures --refine tto \
        --output docs/data/rlpf_prior_failures_post_train_tto.json
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
from tasks.ego_motion.sampling.sampler import refine_decoded, sample_motion
from tasks.ego_motion.task import EgoMotionTask


def prior_failures(split: str, noises: int, steps: int, prior: Path | None, seed: int, refine: str = "none") -> dict:
    """Per-sample outcomes and per-criterion failure counts of the prior's samples (module doc); ``refine``: 'none'
    (the samples as they are) or 'tto' (refined by test-time optimisation, all windows of a noise in one batch).

    Raises:
        ValueError: ``refine`` is neither 'none' nor 'tto'.
    """
    if refine not in ("none", "tto"):
        raise ValueError(f"refine must be 'none' or 'tto', got {refine!r}.")
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
        if refine == "tto":
            decoded = refine_decoded(task, decoded, batch["T_world_cpf"])
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
    per_window = collections.defaultdict(list)
    for s in samples:
        per_window[s["window"]].append(s["planted_foot_speed_m_per_s"])
    spread = {}
    if noises > 1:  # what a group of noises per window can rank: the spread within windows against that between them
        spread = {"within_window_sd": statistics.mean(statistics.stdev(v) for v in per_window.values()),
                  "between_window_sd_of_means": statistics.stdev(statistics.mean(v) for v in per_window.values()),
                  "best_of_window_median": statistics.median(min(v) for v in per_window.values()),
                  "windows_with_a_sample_under_the_bound": sum(
                      min(v) <= tracking.max_planted_foot_speed_m_per_s for v in per_window.values())}
    return {"split": split, "noises": noises, "rollout_steps": steps, "refine": refine, "samples": samples,
            "success": sum(s["success"] for s in samples) / len(samples),
            "missed_by_first_word": dict(missed),
            "planted_foot_speed_median": statistics.median(s["planted_foot_speed_m_per_s"] for s in samples),
            "planted_foot_speed_spread": spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="post_train")
    parser.add_argument("--noises", type=int, default=2,
                        help="samples per window (the RLPF recipe's groups have 8: --noises 8 shows what they rank)")
    parser.add_argument("--steps", type=int, default=10, help="rollout steps K (the RLPF recipe's)")
    parser.add_argument("--prior", type=Path, default=None)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--refine", choices=("none", "tto"), default="none",
                        help="score each sample after test-time optimisation ('tto') or as it is")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = prior_failures(args.split, args.noises, args.steps, args.prior, args.seed, args.refine)
    print(f"{args.split} ({args.refine}): {len(result['samples'])} samples, success {result['success']:.3f}, "
          f"planted-foot speed "
          f"median {result['planted_foot_speed_median']:.2f} m/s; samples missing each criterion (by its first word): "
          f"{result['missed_by_first_word']}; planted-foot speed across noises: {result['planted_foot_speed_spread']}")
    if args.output:
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
