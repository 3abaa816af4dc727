"""RLPF models on the validation windows, as sampled and after test-time optimisation: what settings are chosen on.

The RLPF recipe's held-out table reads the test windows once per run; choices between its settings (e.g.
``--rewards.refine``) are made here instead, on the validation split's floor-contact windows (held-out clips of
post-train activities, ``floor_contact_m = 0.15`` as the recipe serves them). For the prior and each run directory
given (its newest checkpoint), every window is sampled with ``--noises`` seeded noises (the same for every model:
common random numbers) on the evaluation chain, scored as sampled ("base") and after the paper's test-time
optimisation ("tto", ``sampler.evaluate_windows(use_tto=True)``, by default one L-BFGS per sample,
``--tto-optimizer lbfgs_per_sequence``, so that a sample's refinement does not depend on the others in its batch):
MotionGRPO's metrics and the physics measures.
Each run's paired difference from the prior (mean over the window x noise pairs, with a 95 % normal interval) is
reported for the tracking success, the graded tracking score, the planted feet's speed and MPJPE.

    python -m recipes.benchmarks.rlpf_validation --runs NAME=RUN_DIR [NAME=RUN_DIR ...] \
        --output docs/data/rlpf_validation.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path

import torch

import tasks.ego_motion.grpo as ego
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.physics.evaluator import PhysicsEvaluator, summarize
from tasks.ego_motion.sampling.sampler import evaluate_windows
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import EgoMotionTask

COMPARED = ("tracking_success", "tracking_graded", "tracking_planted_foot_speed_m_per_s",
            "tracking_residual_per_weight", "foot_skating_m", "mpjpe_mm")
"""The measures whose paired differences from the prior are reported."""


def per_sample(task: EgoMotionTask, model: torch.nn.Module, evaluator: PhysicsEvaluator, noises: int,
               split: str, tto_cfg: TTOConfig) -> dict[str, dict[str, list[float]]]:
    """variant ('base', 'tto') -> measure -> values over (noise, window), noise-major."""
    out: dict[str, dict[str, list[float]]] = {"base": {}, "tto": {}}
    for noise in range(noises):
        result = evaluate_windows(task, model, split, seed=noise, use_tto=True, tto_cfg=tto_cfg,
                                  chain=task.sampling_chain(), extra_metrics=evaluator.evaluate, progress=False)
        for variant, metrics in result.metrics.items():
            for name, values in metrics.items():
                out[variant].setdefault(name, []).extend(values.tolist())
    return out


def paired(after: list[float], before: list[float]) -> dict[str, float]:
    """Mean of after - before over finite pairs (a pair with an invalid sample, whose measures are inf, is left out),
    with a 95 % normal interval; NaN when no pair is finite."""
    d = [a - b for a, b in zip(after, before, strict=True) if math.isfinite(a - b)]
    if not d:
        return {"mean": math.nan, "low": math.nan, "high": math.nan, "pairs": 0}
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / max(1, len(d) - 1))
    half = 1.96 * sd / math.sqrt(len(d))
    return {"mean": mean, "low": mean - half, "high": mean + half, "pairs": len(d)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=[], help="NAME=RUN_DIR pairs (the recipe's run directories)")
    parser.add_argument("--noises", type=int, default=4, help="seeded noises per window")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--tto-optimizer", choices=("lbfgs_per_sequence", "lbfgs"), default="lbfgs_per_sequence",
                        help="TTOConfig.optimizer of the 'tto' variant ('lbfgs': batched, as the recipe's rewards)")
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    runs = {}
    for pair in args.runs:
        name, sep, path = pair.partition("=")
        if not sep or not name or not path:
            parser.error(f"--runs takes NAME=RUN_DIR pairs, got {pair!r}")
        runs[name] = Path(path)
    cfg = ego.Config()
    task = EgoMotionTask(dataclasses.replace(cfg.task, floor_contact_m=0.15))
    evaluator = PhysicsEvaluator(task.body)
    models = {"prior": load_denoiser(cfg.prior),
              **{name: ego.post_trained_policy(path, cfg.prior) for name, path in runs.items()}}
    tto_cfg = TTOConfig(optimizer=args.tto_optimizer)
    samples = {name: per_sample(task, model, evaluator, args.noises, args.split, tto_cfg)
               for name, model in models.items()}
    # invalid samples (``invalid`` = 1, every physics measure inf) are left out of every mean but ``invalid``'s own
    means = {name: {variant: summarize({k: torch.tensor(v, dtype=torch.float64) for k, v in per.items()})
                    for variant, per in s.items()} for name, s in samples.items()}
    differences = {name: {variant: {k: paired(samples[name][variant][k], samples["prior"][variant][k])
                                    for k in COMPARED} for variant in ("base", "tto")} for name in runs}
    result = {"split": args.split, "tto_optimizer": args.tto_optimizer, "windows": task.num_examples(args.split),
              "noises": args.noises,
              "runs": {name: str(path) for name, path in runs.items()}, "means": means,
              "paired_differences_from_prior": differences}
    for name in models:
        for variant in ("base", "tto"):
            m = means[name][variant]
            print(f"{name:>24} {variant:>4}: " + ", ".join(f"{k} {m[k]:.4g}" for k in COMPARED))
    for name, per in differences.items():
        for variant, d in per.items():
            print(f"{name:>24} {variant:>4} - prior: " + ", ".join(
                f"{k} {v['mean']:+.3g} [{v['low']:+.3g}, {v['high']:+.3g}]" for k, v in d.items()))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
