"""How much of a MotionGRPO gradient is signal? Same-condition gradient cosine of two independent groups.

For each of ``--seeds``, B post-train windows are drawn; two independent rollouts (different random
streams: initial noise, step noise, perturbation) of G samples each are collected on those same
windows with the prior, and the GRPO policy gradient of each is computed (all trained steps, and per
step bucket: early / middle / late thirds of the chain). Two independent estimates of one expected
gradient have cosine ~ SNR^2 / (1 + SNR^2), so a cosine near 0 says the update is mostly noise.
The joint rewards are used (no learned perceptual model: a fresh one would only add noise).

    python recipes/grad_signal_ego_motion.py --name default --seeds 0 1 2 3 4   # the main job's defaults
    python recipes/grad_signal_ego_motion.py --name ratio_window --job.grpo.loss.objective ratio --job.sde-window 0 4
    python recipes/grad_signal_ego_motion.py --name default_null --shuffle-advantages   # the null control

Appends one record per ``--name`` to ``--output`` (JSON), and prints the table row.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tasks.ego_motion.grpo as main_job  # the main job: this script measures its updates
from diffgrpo import cli
from diffgrpo.diagnostics import STEP_BUCKETS, cosine, policy_gradients, step_buckets
from diffgrpo.loss import select_steps
from diffgrpo.probe import probe_indices
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import RandomStreams
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber, step_weights
from diffgrpo.trainer import check_run, parse_reward_specs
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.task import EgoMotionTask

logger = logging.getLogger("recipes.grad_signal_ego_motion")


@dataclass(frozen=True)
class Config:
    """Same-condition gradient cosine of the main job's configuration (or a variant of it)."""

    name: str = "default"
    """Record name in --output."""
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    """One draw of conditions and two independent rollouts per seed."""
    shuffle_advantages: bool = False
    """Null control: permute the advantages within each group before taking gradients. A cosine that stays
    high without the reward's information measures a bias of the objective, not signal."""
    output: Path = Path("runs/grad_signal.json")
    table_output: Path | None = None
    """Also write every record of --output as a markdown table here (e.g. docs/grad_signal.md)."""
    threads: int = 1
    job: main_job.Config = field(default_factory=main_job.Config)
    """The main job's config (prior, task, rollout steps, SDE window, GRPO settings) under --job.*"""


def shuffled_within_groups(data, generator: torch.Generator):
    """The rollout with each group's advantages randomly permuted among its members (the null control)."""
    adv = data.advantages.advantages.clone()
    for group in torch.unique(data.trajectory.group_ids):
        rows = (data.trajectory.group_ids == group).nonzero().flatten()
        adv[rows] = adv[rows[torch.randperm(len(rows), generator=generator)]]
    return dataclasses.replace(data, advantages=dataclasses.replace(data.advantages, advantages=adv))


def main(cfg: Config) -> dict:
    torch.set_num_threads(cfg.threads)
    job = cfg.job
    task = EgoMotionTask(job.task)
    chain = job.rollout_chain()
    grpo = job.grpo
    check_run(task, grpo, chain)
    model = load_denoiser(job.prior)
    rewards = RewardSet.from_specs(parse_reward_specs(grpo.rewards))
    perturber = make_perturber(grpo)
    per_bucket: dict[str, list[float]] = {}
    tick = time.perf_counter()
    for seed in cfg.seeds:
        indices = probe_indices(task.num_examples(grpo.train_split), grpo.conditions_per_iteration, seed,
                                "grad_signal")
        batch = batch_to(task.load_examples(grpo.train_split, indices), "cpu")
        grads = []
        for draw in (0, 1):
            data = collect(task, model, chain, batch, cfg=grpo, rewards=rewards, perturber=perturber,
                           generator=RandomStreams.from_seed(1000 * seed + draw), group_id_offset=0)
            if cfg.shuffle_advantages:
                data = shuffled_within_groups(data, torch.Generator().manual_seed(1000 * seed + draw))
            trained = select_steps(data.trajectory.num_steps, grpo.steps.mode, fraction=grpo.steps.fraction,
                                   window=grpo.steps.window, generator=torch.Generator().manual_seed(seed),
                                   is_stochastic=data.trajectory.is_stochastic.cpu())
            steps = trained.nonzero().flatten().tolist()
            all_rows = torch.arange(data.trajectory.states.shape[0])
            grads.append(policy_gradients(task, model, chain, data, cfg=grpo, row_sets=[all_rows],
                                          steps=steps)[0])
        weight = step_weights(data.trajectory, steps, grpo.step_weighting)  # as policy_update weighs the steps
        buckets = {"all": steps, **step_buckets(steps, data.trajectory.num_steps)}
        for bucket, members in buckets.items():
            if members:
                a, b = (sum(weight[k] * g[k] for k in members) for g in grads)
                per_bucket.setdefault(bucket, []).append(cosine(a, b))
        logger.info("seed %d: cosine %.3f", seed, per_bucket["all"][-1])
    summary = {bucket: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0,
                        "values": v} for bucket, v in per_bucket.items()}
    record = {"name": cfg.name, "seeds": list(cfg.seeds), "seconds": time.perf_counter() - tick,
              "cosine": summary, "job": job.effective()}
    records = json.loads(cfg.output.read_text()) if cfg.output.exists() else {}
    records[cfg.name] = record
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(records, indent=2))
    print(table_row(record))
    if cfg.table_output is not None:
        cfg.table_output.parent.mkdir(parents=True, exist_ok=True)
        cfg.table_output.write_text(render_table(records, cfg.output))
    return record


def table_row(record: dict) -> str:
    summary = record["cosine"]
    row = " | ".join(f"{summary[b]['mean']:+.3f} ± {summary[b]['std']:.3f}" if b in summary else "-"
                     for b in ("all", *STEP_BUCKETS))
    return f"| {record['name']} | {row} | {len(record['seeds'])} |"


def render_table(records: dict[str, dict], source: Path) -> str:
    """Markdown table of every record (mean ± std over seeds of the same-condition gradient cosine)."""
    head = ("| variant | all trained steps | early third | middle third | late third | seeds |\n"
            "|---|---:|---:|---:|---:|---:|\n")
    return (f"Same-condition gradient cosine, written from `{source}` by `recipes/grad_signal_ego_motion.py`.\n\n"
            + head + "\n".join(table_row(r) for r in records.values()) + "\n")


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(cli.parse(Config, renamed=main_job.renamed_flags('--job.')))
