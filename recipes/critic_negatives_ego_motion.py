"""Which negatives make MotionGRPO's perceptual model a useful reward? The perceptual model trained alone, paired.

The policy is held fixed (the prior), so every perceptual-model variant trains on the *same* rollouts, drawn
once per seed with the main job's settings (post-train windows, Perlin heads, K = 10), and is
scored on the same held-out rollouts (test windows): common random numbers, so the differences
between variants are the perceptual model's alone. Per variant (``--variants``, see ``VARIANTS``):
``--iterations`` perceptual-model steps, one per rollout batch, as in the main job (after an optional
warm-up on the prior's samples). Then, on the held-out groups, for each group the Pearson
correlation across its members of the perceptual model's score with:

- ``-mpjpe``: accuracy against the ground truth (what the joint rewards reward);
- ``-foot_skating``: a realism defect the perceptual model is meant to see without the ground truth;

and the perceptual model's InfoNCE accuracy (truth above every member of its group). Reported: mean over
groups with a 95 % interval, and each variant's paired difference from the paper's perceptual model.

    python recipes/critic_negatives_ego_motion.py --seeds 0 1 2 --output docs/data/critic_negatives.json \
        --table-output docs/data/critic_negatives_table.md

What it cannot say: how the perceptual model co-evolves with a moving policy (a GRPO run measures that).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import tasks.ego_motion.grpo as main_job  # the main job: this script measures its perceptual model
from diffgrpo import cli
from diffgrpo.chain import SamplingChain
from diffgrpo.probe import paired_difference
from diffgrpo.rewards import RewardSet
from diffgrpo.rng import RandomStreams, make_generator
from diffgrpo.task import batch_to
from diffgrpo.train_step import collect, make_perturber
from diffgrpo.trainer import check_run, parse_reward_specs
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.rewards.perceptual import PerceptualTrainer
from tasks.ego_motion.rewards.perceptual_data import group_correlations, rollout_negatives
from tasks.ego_motion.task import EgoMotionTask

logger = logging.getLogger("recipes.critic_negatives_ego_motion")

VARIANTS = {
    "paper (x0_last, clean head)": dict(perceptual_negatives=("x0_last",), perceptual_on_own_head=False),
    "x0_last, own head": dict(perceptual_negatives=("x0_last",), perceptual_on_own_head=True),
    "x0_last + members + foreign, own head": dict(perceptual_negatives=("x0_last", "members", "foreign"),
                                                  perceptual_on_own_head=True),
    "paper + warm-up": dict(perceptual_negatives=("x0_last",), perceptual_on_own_head=False,
                            perceptual_warmup_steps=30),
    "all negatives, own head + warm-up": dict(perceptual_negatives=("x0_last", "members", "foreign"),
                                              perceptual_on_own_head=True, perceptual_warmup_steps=30),
}
"""The main job's perceptual model flags per variant; the first is the reference of the paired differences."""
MEASURES = ("corr_neg_mpjpe", "corr_neg_foot_skating", "infonce_accuracy")


@dataclass(frozen=True)
class Config:
    """Critic variants trained on common rollouts of the prior, scored on common held-out rollouts."""

    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = tuple(VARIANTS)
    iterations: int = 20
    """Critic steps (one rollout batch each) per variant: the first 20 iterations of a main-job run."""
    eval_batches: int = 4
    """Held-out rollout batches (conditions_per_iteration test windows x G samples each)."""
    output: Path = Path("runs/critic_negatives.json")
    table_output: Path | None = None
    """Also write the markdown table of every record in --output here (with ``--seeds`` empty: only that)."""
    threads: int = 1
    job: main_job.Config = field(default_factory=main_job.Config)
    """The main job's config (prior, task, rollout steps, G, perturbation, perceptual model size) under --job.*"""

    def __post_init__(self) -> None:
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"--variants {list(self.variants)}: unknown or empty ({unknown}); choose from "
                             f"{list(VARIANTS)}.")
        if self.iterations < 1 or self.eval_batches < 1:
            raise ValueError(f"--iterations {self.iterations} and --eval-batches {self.eval_batches} must be >= 1.")


def summary(values: torch.Tensor) -> dict[str, float]:
    """Mean over groups (NaN groups dropped) and its 95 % t interval."""
    values = values[torch.isfinite(values)]
    d = paired_difference(values[:, None], torch.zeros_like(values)[:, None])
    return {"mean": d.mean, "ci_low": d.ci_low, "ci_high": d.ci_high, "n": d.num_conditions}


def rollouts(task: EgoMotionTask, chain: SamplingChain, prior: torch.nn.Module, grpo, rewards: RewardSet, seed: int,
             split: str, batches: range) -> list[tuple[dict, object]]:
    """Per batch index i: B random ``split`` windows x G rollouts of the prior, from streams of (seed, i)."""
    out = []
    for i in batches:
        order = torch.randperm(task.num_examples(split), generator=make_generator(seed, "critic_windows", i))
        batch = batch_to(task.load_examples(split, order[: grpo.conditions_per_iteration].sort().values), "cpu")
        data = collect(task, prior, chain, batch, cfg=grpo, rewards=rewards,
                       perturber=make_perturber(grpo), generator=RandomStreams.from_seed(seed, process_index=i),
                       group_id_offset=0)
        out.append((batch, data))
    return out


def main(cfg: Config) -> dict:
    if not cfg.seeds:  # only re-render the table of an earlier measurement: no model, no data
        earlier = json.loads(cfg.output.read_text())
        write_table(earlier, cfg)
        return earlier
    torch.set_num_threads(cfg.threads)
    task = EgoMotionTask(cfg.job.task)
    chain = cfg.job.rollout_chain()
    grpo = cfg.job.grpo
    check_run(task, grpo, chain)
    prior = load_denoiser(cfg.job.prior)
    rewards = RewardSet.from_specs(parse_reward_specs(grpo.rewards))
    G = grpo.group_size
    records = {}
    if cfg.output.exists():  # add seeds or variants to an earlier measurement of the same settings
        earlier = json.loads(cfg.output.read_text())
        if earlier["config"] != settings(cfg):
            raise ValueError(f"{cfg.output} holds a measurement with other settings; pass another --output.")
        records = earlier["variants"]
    tick = time.perf_counter()
    for seed in cfg.seeds:

        draw = dict(task=task, chain=chain, prior=prior, grpo=grpo, rewards=rewards, seed=seed)
        train = rollouts(**draw, split=grpo.train_split, batches=range(cfg.iterations))
        held_out = rollouts(**draw, split="test", batches=range(cfg.iterations, cfg.iterations + cfg.eval_batches))
        per_variant, warmed, seconds = {}, {}, {}
        for name in cfg.variants:
            job = dataclasses.replace(cfg.job, grpo=dataclasses.replace(cfg.job.grpo, seed=seed), **VARIANTS[name])
            perceptual = PerceptualTrainer(dataclasses.replace(job.perceptual, seed=seed))
            if job.perceptual_warmup_steps:  # the same for every variant of this seed: warm up once
                if job.perceptual_warmup_steps not in warmed:
                    main_job.warm_up(task, prior, perceptual, job, grpo.train_split)
                    warmed[job.perceptual_warmup_steps] = perceptual.state_dict()
                state = warmed[job.perceptual_warmup_steps]
                perceptual.load_state_dict(state.tensors, state.meta)
            start = time.perf_counter()
            for batch, data in train:
                negatives, heads = rollout_negatives(task, data, batch, G, job.perceptual_negatives,
                                                     on_own_head=job.perceptual_on_own_head)
                perceptual.train_step(batch["joints_world"], batch["T_world_cpf"], negatives, heads)
            measures = {k: [] for k in MEASURES}
            for batch, data in held_out:
                joints = data.decoded["joints_world"]
                score = perceptual.score(joints, data.batch["T_world_cpf"])
                metrics = task.evaluate(data.decoded, data.batch)
                measures["corr_neg_mpjpe"].append(group_correlations(score, -metrics["mpjpe_mm"], G))
                measures["corr_neg_foot_skating"].append(group_correlations(score, -metrics["foot_skating_m"], G))
                truth = perceptual.score(batch["joints_world"], batch["T_world_cpf"])
                measures["infonce_accuracy"].append((truth[:, None] > score.view(-1, G)).all(dim=1).double())
            per_variant[name] = {k: torch.cat(v) for k, v in measures.items()}
            seconds[name] = time.perf_counter() - start
            logger.info("seed %d %s: %s", seed, name, {k: round(summary(v)["mean"], 3) for k, v in
                                                         per_variant[name].items()})
        reference = per_variant[cfg.variants[0]]
        for name, values in per_variant.items():
            record = records.setdefault(name, {"seeds": {}})
            record["seeds"][str(seed)] = {
                k: {**summary(v), "paired_vs_paper": summary(v - reference[k])} for k, v in values.items()}
            record["seeds"][str(seed)]["critic_seconds"] = seconds[name]
        write(records, cfg, time.perf_counter() - tick)  # after every seed: a cut-off run keeps what it measured
    return json.loads(cfg.output.read_text())


def settings(cfg: Config) -> dict:
    """What a measurement's numbers depend on besides seeds and variants (JSON-able)."""
    return json.loads(json.dumps({"iterations": cfg.iterations, "eval_batches": cfg.eval_batches,
                                  "job": cfg.job.effective()}))


def write(records: dict, cfg: Config, seconds: float) -> None:
    """Aggregate over seeds, write --output and print the table."""
    for record in records.values():
        for k in MEASURES:
            means = [s[k]["mean"] for s in record["seeds"].values()]
            record[k] = {"mean_over_seeds": statistics.fmean(means),
                         "sd_over_seeds": statistics.stdev(means) if len(means) > 1 else math.nan}
    out = {"variants": records, "seconds": seconds, "config": settings(cfg),
           "command": "python recipes/critic_negatives_ego_motion.py " + " ".join(sys.argv[1:])}
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(json.dumps(out, indent=2))
    write_table(out, cfg)


def write_table(out: dict, cfg: Config) -> None:
    table = render_table(out)
    print(table)
    if cfg.table_output is not None:
        cfg.table_output.parent.mkdir(parents=True, exist_ok=True)
        cfg.table_output.write_text(f"Written from `{cfg.output}` by `recipes/critic_negatives_ego_motion.py` "
                                    f"({out['command']}).\n\n" + table)


def render_table(out: dict) -> str:
    """Markdown: per variant, each measure's mean over seeds (sd) and the seeds whose paired interval excludes 0."""
    lines = ["| critic variant | " + " | ".join(MEASURES) + " |", "|---|" + "---:|" * len(MEASURES)]
    for name, record in out["variants"].items():
        cells = []
        for k in MEASURES:
            paired = [s[k]["paired_vs_paper"] for s in record["seeds"].values()]
            up = sum(p["ci_low"] > 0 for p in paired)
            down = sum(p["ci_high"] < 0 for p in paired)
            cells.append(f"{record[k]['mean_over_seeds']:+.3f} ± {record[k]['sd_over_seeds']:.3f} "
                         f"(up {up}, down {down} of {len(paired)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(cli.parse(Config, renamed=main_job.renamed_flags('--job.')))
