"""Held-out evaluation of an ego-motion prior: every metric, with and without test-time optimisation.

    python recipes/eval_ego_motion.py                                     # the shipped demo prior
    python recipes/eval_ego_motion.py --prior runs/ego_prior/denoiser.safetensors --seeds 0 1 2 3 4
    python recipes/eval_ego_motion.py --prior egoallo_checkpoint_april13 --task.include-hands ...  # EgoAllo's
                                          # released prior on AMASS: docs/egoallo_checkpoint.md has the flags

Steps (one visible loop):
1. For each seed, sample every test window once (EgoAllo's sampler through the core rollout,
   noise seeded per batch), decode (root from head, FK), refine the same samples with TTO, and
   score both variants against the ground truth (``sampler.evaluate_windows``).
2. The plausibility metrics of the ground truth itself (jitter, GP, FS) as a reference row.
3. Optionally whole test clips, sampled by stitching overlapping windows (``sampler.sample_clip``).
4. Write ``results.json`` and ``results.md`` (mean over windows; +/- the std of that mean over seeds)
   and skeleton pictures (PNG grid + GIF) of the best and the worst window by MPJPE into --output-dir.
The sampling throughput (motions/s: rollout + decode, batches of --batch-size windows) is printed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import tyro

from diffgrpo.rng import make_generator
from tasks.ego_motion.evaluation.render import render_animation_gif, render_frames_png
from tasks.ego_motion.model.network import load_denoiser
from tasks.ego_motion.sampling.sampler import (
    StitchConfig,
    WindowEvaluation,
    evaluate_windows,
    refine_decoded,
    sample_clip,
)
from tasks.ego_motion.sampling.tto import TTOConfig
from tasks.ego_motion.task import (
    DEMO_PRIOR_PATH,
    METRIC_UNITS,
    EgoMotionTask,
    EgoMotionTaskConfig,
    plausibility_metrics,
)

logger = logging.getLogger("recipes.eval_ego_motion")

COLUMN_TITLES: dict[str, str] = {
    "mpjpe_mm": "MPJPE (mm)", "pa_mpjpe_mm": "PA-MPJPE (mm)", "mpjve_mm_per_s": "MPJVE (mm/s)",
    "mpjre_deg": "MPJRE (deg)", "jitter_m_per_s3": "Jitter (m/s^3)", "ground_penetration_m": "GP (m)",
    "foot_skating_m": "FS (m)", "head_position_error_mm": "Head pos (mm)",
    "head_orientation_error_deg": "Head rot (deg)",
}  # fmt: skip
ROW_TITLES = {"base": "prior", "tto": "prior + TTO", "ground_truth": "ground truth"}


@dataclass(frozen=True)
class Config:
    """Evaluate a prior on the held-out windows (and optionally whole clips)."""

    prior: Path = DEMO_PRIOR_PATH
    """The prior to evaluate: a denoiser .safetensors written by network.save_denoiser (the config travels in the
    file), or EgoAllo's released checkpoint folder (model_config.yaml + checkpoints_<N>/, see
    docs/egoallo_checkpoint.md)."""
    checkpoint: Path | None = None
    """Deprecated alias of --prior (the flag's former name)."""
    output_dir: Path = Path("runs/ego_eval")
    """results.json, results.md and the best/worst pictures go here."""
    split: Literal["train", "prior_train", "post_train", "validation", "test"] = "test"
    """Windows to evaluate: 'test' is the held-out split; 'prior_train' the prior's own clips, 'post_train' the
    clips held out from the prior for GRPO (training splits include their mirrored copies), 'validation' the
    clips neither trains on, which select the main job's checkpoint (docs/ego_motion_data.md, section 4)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """One full pass per seed; the table reports the mean over windows and seeds, +/- the std over seeds."""
    batch_size: int = 64
    """Windows sampled per batch (part of the noise seeding: compare runs with the same value)."""
    max_windows: int | None = None
    """Evaluate only the first N windows (None: all)."""
    use_tto: bool = True
    """Also refine every sample with test-time optimisation and report it as a second row."""
    tto: TTOConfig = field(default_factory=TTOConfig)
    num_clips: int = 0
    """Also sample the first N whole test clips by stitching windows (0: skip; -1: every clip)."""
    stitch: StitchConfig = field(default_factory=StitchConfig)
    render: bool = True
    """Write PNG grids and GIFs of the best and worst window (by base MPJPE, first seed)."""
    gif_frame_step: int = 2
    """Draw every n-th frame in the GIFs."""
    num_threads: int = 1
    """torch intra-op threads. On a shared 2-core machine 1 thread sampled 8x faster than 2 (measured)."""
    task: EgoMotionTaskConfig = field(default_factory=EgoMotionTaskConfig)

    def __post_init__(self) -> None:
        if self.checkpoint is not None:  # the deprecated alias: fold it into --prior
            if self.prior != DEMO_PRIOR_PATH and Path(self.prior) != Path(self.checkpoint):
                raise ValueError(f"--checkpoint {self.checkpoint} and --prior {self.prior} disagree; --checkpoint is "
                                 "the deprecated name of --prior, pass only --prior.")
            object.__setattr__(self, "prior", self.checkpoint)
            object.__setattr__(self, "checkpoint", None)
        if not self.seeds:
            raise ValueError("no seeds: pass at least one, e.g. --seeds 0.")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}.")
        if self.stitch.window_frames != self.task.window_frames:
            raise ValueError(f"--stitch.window-frames {self.stitch.window_frames} differs from --task.window-frames "
                             f"{self.task.window_frames}; stitch windows of the length the prior was trained on.")
        if self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}.")


def summarise(per_seed: list[dict[str, torch.Tensor]]) -> dict[str, dict[str, float | list[float]]]:
    """metric -> mean (over seeds of the window mean), std over seeds (0 with one seed), per-seed means."""
    out: dict[str, dict[str, float | list[float]]] = {}
    for name in per_seed[0]:
        means = torch.tensor([float(m[name].double().mean()) for m in per_seed], dtype=torch.float64)
        out[name] = {"mean": float(means.mean()), "std_over_seeds": float(means.std()) if len(means) > 1 else 0.0,
                     "per_seed": means.tolist()}
    return out


def markdown_table(rows: dict[str, dict[str, dict]], show_std: bool) -> str:
    """One row per variant, one column per metric (``METRIC_UNITS`` order); '-' where not defined."""
    header = "| method | " + " | ".join(COLUMN_TITLES[m] for m in METRIC_UNITS) + " |"
    lines = [header, "|---" * (len(METRIC_UNITS) + 1) + "|"]
    for variant, summary in rows.items():
        cells = []
        for name in METRIC_UNITS:
            if name not in summary:
                cells.append("-")
                continue
            digits = 4 if name == "ground_penetration_m" else 3 if summary[name]["mean"] < 10 else 1
            cell = f"{summary[name]['mean']:.{digits}f}"
            if show_std and len(summary[name].get("per_seed", [])) > 1:  # the ground truth has no seeds
                cell += f" ± {summary[name]['std_over_seeds']:.{digits}f}"
            cells.append(cell)
        lines.append(f"| {ROW_TITLES.get(variant, variant)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def render_extremes(task: EgoMotionTask, evaluation: WindowEvaluation, split: str, output_dir: Path,
                    frame_step: int) -> dict[str, dict]:
    """PNG grid + GIF of the best and worst window by base MPJPE (ground truth blue, prediction orange)."""
    mpjpe = evaluation.metrics["base"]["mpjpe_mm"]
    picks = {"best": int(mpjpe.argmin()), "worst": int(mpjpe.argmax())}
    out = {}
    for label, row in picks.items():
        index = int(evaluation.indices[row])
        batch = task.load_examples(split, torch.tensor([index]))
        gt, pred = batch["joints_world"][0], evaluation.joints_world["base"][row]
        head = batch["T_world_cpf"][0, 1:, :3, 3]
        name = task.windows(split).sequence_names([index])[0]
        title = f"{label}: window {index} ({name}), MPJPE {float(mpjpe[row]):.0f} mm"
        png = render_frames_png(output_dir / f"{label}_window.png", gt, pred, head, title=title)
        gif = render_animation_gif(output_dir / f"{label}_window.gif", gt, pred, head, title=title,
                                   frame_step=frame_step)
        out[label] = {"window": index, "sequence": name, "mpjpe_mm": float(mpjpe[row]), "png": str(png),
                      "gif": str(gif)}
    return out


def evaluate_clips(task: EgoMotionTask, model, cfg: Config) -> dict[str, list[dict[str, float]]]:
    """Per-clip metrics of whole test clips sampled by stitching (seed: the first of --seeds)."""
    files = task.cfg.data_source().files("test")
    files = files if cfg.num_clips < 0 else files[: cfg.num_clips]
    rows: dict[str, list[dict[str, float]]] = {"base": [], "tto": []} if cfg.use_tto else {"base": []}
    for path in files:
        generator = make_generator(cfg.seeds[0], "eval_clip", path.stem)
        batch, sample = sample_clip(task, model, path, generator=generator, stitch_cfg=cfg.stitch)
        decoded = {"base": sample.decoded}
        if cfg.use_tto:
            decoded["tto"] = refine_decoded(task, sample.decoded, batch["T_world_cpf"], cfg.tto)
        for variant, dec in decoded.items():
            values = {k: float(v[0]) for k, v in task.evaluate(dec, batch).items()}
            rows[variant].append({"clip": path.stem, "frames": batch["joints_world"].shape[1], **values})
    return rows


def run_eval(cfg: Config) -> dict:
    """Evaluate, write results.json / results.md (and pictures) into cfg.output_dir; returns the results."""
    if not cfg.prior.exists():
        raise FileNotFoundError(f"no prior at {cfg.prior}; train one with recipes/pretrain_ego_motion.py "
                                "or pass --prior PATH (a .safetensors or EgoAllo's checkpoint folder).")
    torch.set_num_threads(cfg.num_threads)
    model = load_denoiser(cfg.prior).eval()
    if model.config.include_hands != cfg.task.include_hands:
        raise ValueError(f"the prior has include_hands={model.config.include_hands} but the task "
                         f"{cfg.task.include_hands}; pass --task.include-hands {model.config.include_hands}.")
    task = EgoMotionTask(cfg.task)
    cfg.output_dir.mkdir(parents=True, exist_ok=True)

    per_seed: dict[str, list[dict[str, torch.Tensor]]] = {}
    evaluations: list[WindowEvaluation] = []
    for seed in cfg.seeds:  # one seeded pass: sample, decode, (TTO), score
        evaluation = evaluate_windows(task, model, cfg.split, seed=seed, use_tto=cfg.use_tto, tto_cfg=cfg.tto,
                                      batch_size=cfg.batch_size, max_windows=cfg.max_windows,
                                      keep_joints=seed == cfg.seeds[0])
        evaluations.append(evaluation)
        for variant, values in evaluation.metrics.items():
            per_seed.setdefault(variant, []).append(values)
    num_windows = len(evaluations[0].indices)
    gt_joints = task.load_examples(cfg.split, evaluations[0].indices)["joints_world"]
    reference = plausibility_metrics(gt_joints, task.fps)

    rows = {variant: summarise(values) for variant, values in per_seed.items()}
    rows["ground_truth"] = summarise([reference])
    sampled = num_windows * len(cfg.seeds)
    sampling_seconds = sum(e.sampling_seconds for e in evaluations)
    throughput = {
        "motions_per_s": sampled / sampling_seconds,
        "frames_per_s": sampled * task.cfg.window_frames / sampling_seconds,
        "tto_motions_per_s": sampled / max(sum(e.tto_seconds for e in evaluations), 1e-9) if cfg.use_tto else None,
        "batch_size": cfg.batch_size,
        "threads": torch.get_num_threads(),
        "network_calls_per_motion": task.cfg.num_sampling_steps,
    }
    results: dict = {
        "checkpoint": str(cfg.prior),
        "split": cfg.split,
        "num_windows": num_windows,
        "window_frames": task.cfg.window_frames,
        "seeds": list(cfg.seeds),
        "units": METRIC_UNITS,
        "metrics": rows,
        "per_window_first_seed": {variant: {name: values.tolist() for name, values in metrics.items()}
                                  for variant, metrics in evaluations[0].metrics.items()},
        "throughput": throughput,
        "config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
    }
    if cfg.num_clips != 0:
        clips = evaluate_clips(task, model, cfg)
        results["clips"] = clips
        results["clip_metrics"] = {v: {name: {"mean": sum(r[name] for r in rs) / len(rs), "std_over_seeds": 0.0}
                                       for name in METRIC_UNITS} for v, rs in clips.items()}
    if cfg.render:
        results["pictures"] = render_extremes(task, evaluations[0], cfg.split, cfg.output_dir, cfg.gif_frame_step)

    sampler = task.sampler_config()
    md = [
        "# Ego-motion evaluation\n",
        f"Prior `{cfg.prior}`, split `{cfg.split}`: {num_windows} windows x {task.cfg.window_frames} "
        f"frames at 30 fps; seeds {list(cfg.seeds)}; sampler `{sampler.method}` (eta {sampler.eta}, "
        f"offset {sampler.egoallo_denominator_offset}), {task.cfg.num_sampling_steps} steps; TTO "
        f"{cfg.tto.optimizer} x {cfg.tto.num_iterations}. Values: mean over windows"
        + (", ± std of that mean over seeds" if len(cfg.seeds) > 1 else "") + ". FS is summed over a window's "
        "frames; GP and FS in metres, jitter in m/s^3 (no scale factor).\n",
        markdown_table(rows, show_std=len(cfg.seeds) > 1),
    ]
    if "clip_metrics" in results:
        md += [f"\nWhole test clips ({len(results['clips']['base'])}), stitched windows of "
               f"{cfg.stitch.window_frames} frames overlapping by {cfg.stitch.overlap_frames}; mean over clips "
               "(FS summed over each clip's frames):\n", markdown_table(results["clip_metrics"], show_std=False)]
    md.append(f"\nSampling throughput: {throughput['motions_per_s']:.2f} motions/s "
              f"({throughput['frames_per_s']:.0f} frames/s; batches of {cfg.batch_size}, "
              f"{throughput['threads']} threads, {task.cfg.num_sampling_steps} network calls per motion).\n")
    (cfg.output_dir / "results.md").write_text("\n".join(md))
    (cfg.output_dir / "results.json").write_text(json.dumps(results, indent=1, allow_nan=True))
    return results


SPLIT_COLUMNS = ("mpjpe_mm", "pa_mpjpe_mm", "mpjve_mm_per_s", "mpjre_deg", "jitter_m_per_s3", "foot_skating_m")


def splits_table(result_files: list[Path]) -> str:
    """One row per evaluated split (the base rows of several results.json files): how far the prior is
    from its own training clips, the clips held out for post-training, and the test clips."""
    lines = ["| split | windows | " + " | ".join(f"{m} ({METRIC_UNITS[m]})" for m in SPLIT_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(SPLIT_COLUMNS)]
    for path in result_files:
        record = json.loads(Path(path).read_text())
        base = record["metrics"]["base"]
        lines.append(f"| {record['split']} | {record['num_windows']} | " + " | ".join(
            f"{base[m]['mean']:.{3 if m == 'foot_skating_m' else 1}f}" for m in SPLIT_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def main(cfg: Config) -> dict:
    start = time.perf_counter()
    results = run_eval(cfg)
    print((cfg.output_dir / "results.md").read_text())
    tp = results["throughput"]
    print(f"sampling: {tp['motions_per_s']:.2f} motions/s ({tp['frames_per_s']:.0f} frames/s)"
          + (f"; TTO: {tp['tto_motions_per_s']:.2f} motions/s" if tp["tto_motions_per_s"] else ""))
    bad = [f"{v}/{n}" for v, s in results["metrics"].items() for n, x in s.items() if not math.isfinite(x["mean"])]
    if bad:
        print(f"warning: non-finite metrics {bad}")
    print(f"wrote {cfg.output_dir}/results.md, results.json in {time.perf_counter() - start:.0f} s")
    return results


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    main(tyro.cli(Config))
