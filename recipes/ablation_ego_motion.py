"""The shape of MotionGRPO's ablation table, with seeds and spread.

Runs ``recipes/ego_motion.py``'s ``main`` once per (variant, seed) and aggregates the held-out
metrics as mean and standard deviation over seeds:

| variant | rewards | perturbation |
|---|---|---|
| prior | - | - (the evaluation of the prior itself) |
| vanilla | joint rewards | none |
| +visual | joint + perceptual | none |
| full (+Perlin) | joint + perceptual | Perlin, lambda |
| full, Gaussian | joint + perceptual | Gaussian white noise, lambda |
| lambda sweep | joint + perceptual | Perlin, each of --lambdas |

Every variant is reported with and without test-time optimisation. For vanilla and full it also
reports the training diagnostics the paper's argument rests on: the fraction of zero-std
groups, the mean within-group std of each sub-reward and the intra-group diversity.

    python recipes/ablation_ego_motion.py --seeds 0 1 2 --output docs/results.md
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

import tyro

_spec = importlib.util.spec_from_file_location("ego_motion_recipe", Path(__file__).with_name("ego_motion.py"))
ego = importlib.util.module_from_spec(_spec)
sys.modules["ego_motion_recipe"] = ego
_spec.loader.exec_module(ego)


@dataclass(frozen=True)
class Config:
    """Seeds, variants and where to write the table."""

    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (0.01, 0.03, 0.1)
    """Perlin amplitudes (metres of head translation) of the sweep; the full model uses base.grpo's."""
    variants: tuple[str, ...] = ("vanilla", "visual", "full", "gaussian", "sweep")
    output_dir: Path = Path("runs/ablation")
    output: Path = Path("docs/results.md")
    base: ego.Config = field(default_factory=ego.Config)
    """The main job's config every variant starts from (iterations, group size, omegas...)."""


def variant_configs(cfg: Config) -> dict[str, ego.Config]:
    base, lam = cfg.base, cfg.base.grpo.perturb.scale
    none = dataclasses.replace(base.grpo.perturb, name="none", scale=0.0)

    def make(use_visual: bool, perturb) -> ego.Config:
        return dataclasses.replace(base, use_visual_reward=use_visual, grpo=dataclasses.replace(base.grpo,
                                                                                               perturb=perturb))

    out: dict[str, ego.Config] = {}
    if "vanilla" in cfg.variants:
        out["vanilla"] = make(False, none)
    if "visual" in cfg.variants:
        out["+visual"] = make(True, none)
    if "full" in cfg.variants:
        out[f"+Perlin (full, lambda={lam})"] = make(True, dataclasses.replace(base.grpo.perturb, name="perlin"))
    if "gaussian" in cfg.variants:
        out[f"full with Gaussian (lambda={lam})"] = make(True, dataclasses.replace(base.grpo.perturb,
                                                                                    name="gaussian"))
    if "sweep" in cfg.variants:
        for value in cfg.lambdas:
            if value != lam or "full" not in cfg.variants:
                out[f"full, lambda={value}"] = make(True, dataclasses.replace(base.grpo.perturb, name="perlin",
                                                                             scale=value))
    return out


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def main(cfg: Config) -> dict:
    runs: dict[str, list[dict]] = {}
    for name, variant in variant_configs(cfg).items():
        for seed in cfg.seeds:
            slug = "".join(c if c.isalnum() else "_" for c in name) + f"_seed{seed}"
            out_dir = cfg.output_dir / slug
            seeded = dataclasses.replace(variant.grpo, seed=seed)
            run_cfg = dataclasses.replace(variant, output_dir=out_dir, grpo=seeded)
            result_file = out_dir / "results.json"
            result = json.loads(result_file.read_text()) if result_file.exists() else ego.main(run_cfg)
            history = json.loads((out_dir / "history.json").read_text()) if (out_dir / "history.json").exists() else {}
            runs.setdefault(name, []).append({**result, "history": history})
    table = render(runs, cfg)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(table)
    (cfg.output_dir / "ablation.json").write_text(json.dumps(runs, indent=2, default=str))
    print(table)
    return runs


def render(runs: dict[str, list[dict]], cfg: Config) -> str:
    metrics = list(ego.METRIC_UNITS)
    header = "| variant | " + " | ".join(f"{m} ({ego.METRIC_UNITS[m]})" for m in metrics) + " |"
    lines = [header, "|---|" + "---:|" * len(metrics)]
    first = next(iter(runs.values()))
    for tto in ("", "+tto"):
        key_base, key_grpo = "base" + tto, "grpo" + tto
        if key_base not in first[0]:
            continue
        lines.append("| prior" + (" + TTO" if tto else "") + " | " +
                     " | ".join(mean_std([r[key_base][m] for r in first]) for m in metrics) + " |")
        for name, results in runs.items():
            lines.append(f"| {name}{' + TTO' if tto else ''} | " +
                         " | ".join(mean_std([r[key_grpo][m] for r in results]) for m in metrics) + " |")
    diag = ["", "| variant | zero-std group fraction | mean group std (joint sub-rewards) | intra-group diversity |",
            "|---|---:|---:|---:|"]
    for name, results in runs.items():
        cols = []
        for prefix in ("adv/zero_std_frac", "adv/group_std/ego_", "diversity/final_samples"):
            per_run = []
            for r in results:
                keys = [k for k in r["history"] if k == prefix or (prefix.endswith("_") and k.startswith(prefix))]
                vals = [v for k in keys for v in r["history"][k]]
                if vals:
                    per_run.append(sum(vals) / len(vals))
            cols.append(mean_std(per_run) if per_run else "-")
        diag.append(f"| {name} | " + " | ".join(cols) + " |")
    seeds = ", ".join(str(s) for s in cfg.seeds)
    return (f"Held-out CMU test windows, mean ± std over seeds {seeds}. Command: "
            f"`python recipes/ablation_ego_motion.py --seeds {' '.join(str(s) for s in cfg.seeds)}`.\n\n"
            + "\n".join(lines) + "\n" + "\n".join(diag) + "\n")


if __name__ == "__main__":
    main(tyro.cli(Config))
