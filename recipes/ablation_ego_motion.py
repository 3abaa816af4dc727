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
| full, group-shared | joint + perceptual | Perlin, one perturbed head per group |
| full, nested | joint + perceptual | Perlin, P heads x G/P samples, advantages per same-head sub-group |
| supervised | continued diffusion training of the prior on the post-train clips (the baseline GRPO must beat) |

Gaussian, group-shared and nested take the base's lambda, or another after an '@' (``--variants nested@0.1``).
A finished run is read back only if its stored config is the one asked for (else a ValueError says what
differs), so the table never mixes experiments after the main job's defaults change.

Every variant is reported with and without test-time optimisation. For vanilla and full it also
reports the training diagnostics the paper's argument rests on: the fraction of zero-std
groups, the mean within-group std of each sub-reward and the intra-group diversity.

    python recipes/ablation_ego_motion.py --seeds 0 1 2 --output docs/results.md
    python recipes/ablation_ego_motion.py --variants nested nested@0.1 --output-dir runs/ablation --output nested.md

Length: a recipe reads top to bottom (torchtune's rule); the variants table, the runner that reads
back finished runs, and the table writer are this recipe's alone and are kept with it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shlex
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import tasks.ego_motion.grpo as ego
import tasks.ego_motion.pretrain as pretrain
from diffgrpo import cli
from diffgrpo.checkpoint import git_revision
from diffgrpo.cli import flags_spelled
from diffgrpo.config import PerturbConfig

logger = logging.getLogger("recipes.ablation_ego_motion")



@dataclass(frozen=True)
class Config:
    """Seeds, variants and where to write the table."""

    seeds: tuple[int, ...] = (0, 1, 2)
    lambdas: tuple[float, ...] = (0.01, 0.03, 0.1, 1.0)
    """Perlin amplitudes (metres of head translation) of the sweep; the full model uses base.grpo's."""
    variants: tuple[str, ...] = ("vanilla", "visual", "full", "gaussian@0.03", "sweep", "group@0.03", "nested@0.03",
                                 "nested@0.1", "supervised")
    """Rows of the table (VARIANT_KINDS). gaussian, group and nested run at base.grpo's lambda, or at the one after
    an '@': e.g. ``nested nested@0.1`` gives nested heads at both lambdas. The defaults are docs/results.md's rows."""
    supervised_steps: int = 600
    """Optimiser steps of the supervised baseline (batch 32 on the post-train windows): about the main job's
    training time on 2 CPU cores (see docs/ego_motion_grpo.md for the measured rates)."""
    supervised_learning_rate: float = 1e-4
    """Constant AdamW learning rate of the supervised baseline (the prior was trained at 1e-3)."""
    report_only: bool = False
    """Aggregate the finished runs only, never starting or resuming one (e.g. while the others still train);
    the table says which (variant, seed) runs are missing."""
    output_dir: Path = Path("runs/ablation")
    output: Path = Path("docs/results.md")
    base: ego.Config = field(default_factory=ego.Config)
    """The main job's config every variant starts from (iterations, group size, omegas...)."""

    def __post_init__(self) -> None:
        variant_configs(self)  # a bad variant or lambda fails here, before any run starts


VARIANT_KINDS = ("vanilla", "visual", "full", "gaussian", "group", "nested", "sweep", "supervised")
"""The ablation's rows, in table order (the module docstring says what each changes)."""
KINDS_WITH_LAMBDA = ("gaussian", "group", "nested")
"""The kinds that take another lambda after an '@' (the sweep's amplitudes are ``--lambdas``)."""


def parse_variant(entry: str) -> tuple[str, float | None]:
    """``"nested@0.1"`` -> ``("nested", 0.1)``; ``"nested"`` -> ``("nested", None)`` (base.grpo's lambda).

    Raises:
        ValueError: an unknown kind, an '@' on a kind that takes no lambda, or a lambda that is not a
            positive finite number.
    """
    kind, at, value = entry.partition("@")
    if kind not in VARIANT_KINDS:
        raise ValueError(f"unknown variant {entry!r}; pick from {', '.join(VARIANT_KINDS)}")
    if not at:
        return kind, None
    if kind not in KINDS_WITH_LAMBDA:
        raise ValueError(f"variant {entry!r}: only {', '.join(KINDS_WITH_LAMBDA)} take '@lambda' "
                         "(the sweep's amplitudes are --lambdas)")
    try:
        amplitude = float(value)
    except ValueError:
        raise ValueError(f"variant {entry!r}: {value!r} after '@' is not a number (e.g. nested@0.1)") from None
    if not math.isfinite(amplitude) or amplitude <= 0.0:
        raise ValueError(f"variant {entry!r}: lambda must be a positive number of metres (e.g. nested@0.1)")
    return kind, amplitude


IGNORED_CONFIG_KEYS = frozenset({"output_dir", "resume", "threads", "num_threads", "use_progress_bar", "cache_dir",
                                 "checkpoint_every", "log_every"})
"""Config entries that do not change what a run computes: a finished run is read back whatever they were. A key
is matched by its last name, at any depth (``grpo.checkpoint_every`` and ``checkpoint_every`` alike)."""
RENAMED_CONFIG_KEYS = {"use_visual_reward": "use_perceptual_reward", "omega_vis": "perceptual_omega",
                       "critic_negatives": "perceptual_negatives", "critic_on_own_head": "perceptual_on_own_head",
                       "critic_warmup_steps": "perceptual_warmup_steps",
                       "critic_warmup_batch_size": "perceptual_warmup_batch_size"}
"""Config entries of runs stored before the learned reward had one name -> today's names (matched by last name)."""
REPO_ROOT = Path(__file__).resolve().parents[1]


def _comparable(value):
    """A path inside the repository as a path relative to its root (so runs made in another checkout, or with
    a relative ``--base.prior``, compare equal); any other value unchanged."""
    if isinstance(value, str) and "/" in value:
        path = Path(value) if Path(value).is_absolute() else REPO_ROOT / value
        if path.exists() and path.resolve().is_relative_to(REPO_ROOT):
            return path.resolve().relative_to(REPO_ROOT).as_posix()
        parts = Path(value).parts  # a checkout elsewhere: keep what follows its repository-level folders
        for anchor in ("tasks", "runs", "docs"):
            if Path(value).is_absolute() and anchor in parts:
                return Path(*parts[parts.index(anchor):]).as_posix()
    return value


def _ignored(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in IGNORED_CONFIG_KEYS


def _flatten(values: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in values.items():
        out.update(_flatten(value, f"{prefix}{key}.") if isinstance(value, dict)
                   else {prefix + key: _comparable(value)})
    return out


def _renamed(key: str) -> str:
    """``key`` (dotted) with its last name as today's config spells it (``RENAMED_CONFIG_KEYS``)."""
    head, dot, last = key.rpartition(".")
    return head + dot + RENAMED_CONFIG_KEYS.get(last, last)


def _as_json(config) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(config), default=str))


def variant_configs(cfg: Config) -> dict[str, ego.Config]:
    """The main job's config of every row of the table, by row name, in table order (the supervised baseline
    is not a main-job run and is left out).

    Raises:
        ValueError: a bad entry in ``cfg.variants`` (``parse_variant``) or a perturbation the config refuses.
    """
    base, lam = cfg.base, cfg.base.grpo.perturb.scale
    perturb = base.grpo.perturb
    none = PerturbConfig()

    def make(use_visual: bool, perturb) -> ego.Config:
        return dataclasses.replace(base, use_perceptual_reward=use_visual, grpo=dataclasses.replace(base.grpo,
                                                                                               perturb=perturb))

    out: dict[str, ego.Config] = {}
    if "vanilla" in cfg.variants:
        out["vanilla"] = make(False, none)
    if "visual" in cfg.variants:
        out["+visual"] = make(True, none)
    if "full" in cfg.variants:
        out[f"+Perlin (full, lambda={lam})"] = make(True, dataclasses.replace(base.grpo.perturb, name="perlin"))
    specs = [parse_variant(entry) for entry in cfg.variants]

    def amplitudes(kind: str) -> list[float]:
        return [lam if value is None else value for k, value in specs if k == kind]

    for value in amplitudes("gaussian"):
        out[f"full with Gaussian (lambda={value})"] = make(True, PerturbConfig(
            name="gaussian", scale=value, sharing=perturb.sharing, heads_per_group=perturb.heads_per_group))
    for value in amplitudes("group"):
        out[f"full, group-shared head (lambda={value})"] = make(True, dataclasses.replace(
            perturb, name="perlin", scale=value, sharing="group"))
    for value in amplitudes("nested"):
        out[f"full, nested heads (lambda={value})"] = make(True, dataclasses.replace(
            perturb, name="perlin", scale=value, sharing="nested", heads_per_group=2))
    if "sweep" in cfg.variants:
        for value in cfg.lambdas:
            if value != lam or "full" not in cfg.variants:
                out[f"full, lambda={value}"] = make(True, dataclasses.replace(base.grpo.perturb, name="perlin",
                                                                             scale=value))
    return out


PAPER_METRICS = ("mpjpe_mm", "pa_mpjpe_mm", "mpjve_mm_per_s", "mpjre_deg", "jitter_m_per_s3",
                 "ground_penetration_m", "foot_skating_m")
"""The seven columns of the paper's table (the head errors are zero by construction: the root is
recovered from the head)."""
DIAGNOSTICS = {
    "zero-std group fraction": ("adv/zero_std_frac",),
    "within-group std, mean of joint sub-rewards": ("adv/group_std/ego_rot", "adv/group_std/ego_pos",
                                                    "adv/group_std/ego_pa_pos", "adv/group_std/ego_vel"),
    "advantage std": ("adv/adv_std",),
    "intra-group diversity": ("diversity/final_samples",),
}
"""Training diagnostics per run: the mean over iterations (and over the listed keys)."""


def mean_std(values: list[float], digits: int = 2) -> str:
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def digits_for(metric: str) -> int:
    return 4 if metric == "ground_penetration_m" else 3 if metric == "foot_skating_m" else 2


def diagnostic(history: dict[str, list[float]], keys: tuple[str, ...]) -> float | None:
    values = [sum(history[k]) / len(history[k]) for k in keys if history.get(k)]
    return sum(values) / len(values) if values else None


def base_flags(cfg: Config) -> str:
    """The command-line flags (each with a leading space, shell-quoted) that give ``cfg.base`` and the supervised
    baseline's settings from the defaults of the code that writes the table; run paths and thread counts are
    left out. The table also names the commit, since the defaults themselves move."""
    flags = []
    wanted, defaults = _flatten(_as_json(cfg.base)), _flatten(_as_json(ego.Config()))
    for key, value in wanted.items():
        if _ignored(key) or value == defaults.get(key):
            continue
        *parents, leaf = f"base.{key}".replace("_", "-").split(".")
        if isinstance(value, bool):  # tyro's spelling: --base.use-tto / --base.no-use-tto
            flags.append(" --" + ".".join([*parents, leaf if value else f"no-{leaf}"]))
            continue
        shown = " ".join(shlex.quote(str(v)) for v in value) if isinstance(value, list) else shlex.quote(str(value))
        flags.append(f" --{'.'.join([*parents, leaf])} {shown}")
    for name in ("supervised_steps", "supervised_learning_rate"):
        if getattr(cfg, name) != getattr(Config, name):
            flags.append(f" --{name.replace('_', '-')} {getattr(cfg, name)}")
    return "".join(flags)


def preamble(runs: dict[str, list[dict]], cfg: Config) -> str:
    """What was run: the command, the shared config and the variants."""
    g, seeds = cfg.base.grpo, " ".join(str(s) for s in cfg.seeds)
    lambdas = " ".join(str(x) for x in cfg.lambdas)
    per_variant = {name: [r["train_seconds"] for r in results if "train_seconds" in r]
                   for name, results in runs.items()}
    timing = "".join(f" {name}: training took {statistics.mean(secs) / 60:.1f} min per run on average "
                     f"({', '.join(f'{x / 60:.1f}' for x in secs)} min; 1 thread, cores shared with other jobs)."
                     for name, secs in per_variant.items() if secs)
    return (
        "# MotionGRPO ablation\n\n"
        "Written by\n\n```bash\n"
        f"python recipes/ablation_ego_motion.py --seeds {seeds} --lambdas {lambdas} "
        f"--variants {' '.join(cfg.variants)}{base_flags(cfg)} --output-dir {cfg.output_dir} --output {cfg.output}"
        "\n```\n\n"
        f"at commit {git_revision()} (finished runs in `--output-dir` are read back if their stored configs match, "
        "unfinished ones resume from their last checkpoint). "
        "Every run is the main job "
        "(`recipes/ego_motion.py`) with its defaults (and the `--base` flags above) except for what the variant "
        "changes: "
        f"{g.num_iterations} iterations of {g.conditions_per_iteration} training conditions x groups of "
        f"{g.group_size}, rollouts of {cfg.base.rollout_sampling_steps or cfg.base.task.num_sampling_steps} steps, "
        f"objective {g.loss.objective}, AdamW lr {g.optim.learning_rate:g}, rewards {', '.join(g.rewards)}"
        f" (+ ego_perceptual, perceptual_omega {cfg.base.perceptual_omega:g}, where the variant uses it), "
        "perturbation of the head "
        f"translation at {g.perturb.frequency:g} cells per frame, evaluation on all held-out CMU test windows "
        f"with eval seed {cfg.base.eval_seed}; the training seed is the `--grpo.seed` of each run.{timing}\n\n"
        "| variant | rewards | head perturbation |\n|---|---|---|\n"
        "| vanilla | joint | none |\n| +visual | joint + perceptual | none |\n"
        f"| +Perlin (full, lambda=x) | joint + perceptual | Perlin, lambda x m ({g.perturb.sharing} sharing) |\n"
        "| full with Gaussian (lambda=x) | joint + perceptual | white Gaussian, std x m |\n"
        "| full, group-shared head (lambda=x) | joint + perceptual | Perlin, lambda x m, one head per group |\n"
        "| full, nested heads (lambda=x) | joint + perceptual | Perlin, lambda x m, 2 heads x G/2 samples, advantages "
        "per same-head sub-group |\n"
        "| full, lambda=x | joint + perceptual | Perlin, lambda x m |\n\n")


def render(runs: dict[str, list[dict]], cfg: Config) -> str:
    """Markdown: metric table (mean ± std over seeds), per-seed MPJPE changes and training diagnostics."""
    metrics = PAPER_METRICS
    first = next(iter(runs.values()))
    lines = ["| variant | " + " | ".join(f"{m} ({ego.METRIC_UNITS[m]})" for m in metrics) + " | beats prior on |",
             "|---|" + "---:|" * len(metrics) + "---:|"]
    for tto in ("", "+tto"):
        key_base, key_grpo = "base" + tto, "grpo" + tto
        if key_base not in first[0]:
            continue
        prior = {m: statistics.mean(r[key_base][m] for r in first) for m in metrics}
        lines.append("| prior" + (" + TTO" if tto else "") + " | " +
                     " | ".join(mean_std([r[key_base][m] for r in first], digits_for(m)) for m in metrics) + " | |")
        for name, results in runs.items():
            means = {m: statistics.mean(r[key_grpo][m] for r in results) for m in metrics}
            wins = sum(means[m] < prior[m] for m in metrics)
            lines.append(f"| {name}{' + TTO' if tto else ''} | " +
                         " | ".join(mean_std([r[key_grpo][m] for r in results], digits_for(m)) for m in metrics) +
                         f" | {wins}/{len(metrics)} |")
    per_seed = ["| variant | " + " | ".join(f"seed {s}" for s in cfg.seeds) + " | mean |", "|---|" +
                "---:|" * (len(cfg.seeds) + 1)]
    for name, results in runs.items():
        change = {r["seed"]: 100.0 * (r["grpo"]["mpjpe_mm"] / r["base"]["mpjpe_mm"] - 1.0) for r in results}
        per_seed.append(f"| {name} | " + " | ".join(f"{change[s]:+.2f} %" if s in change else "-" for s in cfg.seeds)
                        + f" | {statistics.mean(change.values()):+.2f} % |")
    diag = ["| variant | " + " | ".join(DIAGNOSTICS) + " |", "|---|" + "---:|" * len(DIAGNOSTICS)]
    for name, results in runs.items():
        cols = []
        for keys in DIAGNOSTICS.values():
            per_run = [v for r in results if (v := diagnostic(r["history"], keys)) is not None]
            cols.append(mean_std(per_run, 4) if per_run else "-")
        diag.append(f"| {name} | " + " | ".join(cols) + " |")
    seeds = " ".join(str(s) for s in cfg.seeds)
    probe = probe_table(runs, cfg)
    return (preamble(runs, cfg) + "## Held-out metrics\n\n"
            f"Mean ± std over training seeds {seeds} (the prior is evaluated with the same held-out noise in every "
            "run, so it has no spread). 'beats prior on' counts the columns whose mean is lower than the prior's.\n\n"
            + "\n".join(lines) + "\n\n## MPJPE change against the prior, per seed\n\n" + "\n".join(per_seed)
            + f"\n\n![MPJPE and PA-MPJPE change per seed]({cfg.output.with_suffix('.png').name})"
            + (f"\n\n## Probe set: paired change at the last evaluation against the first\n\n{probe}" if probe else "")
            + "\n\n## Training diagnostics (means over iterations)\n\n" + "\n".join(diag) + "\n")


PROBE_KEYS = {"reward sum, post-train": "reward/post_train/total", "reward sum, validation": "reward/validation/total",
              "MPJPE, post-train (mm)": "metric/post_train/mpjpe_mm",
              "MPJPE, validation (mm)": "metric/validation/mpjpe_mm",
              "PA-MPJPE, validation (mm)": "metric/validation/pa_mpjpe_mm",
              "foot skating, validation (m)": "metric/validation/foot_skating_m"}
"""Probe quantities reported per seed: ``probe_diff/<key>`` of history.json, with its 95 % interval. The probe
reads post_train and validation only (the job's defaults); the test split is read once, at the end of each run."""


def probe_table(runs: dict[str, list[dict]], cfg: Config) -> str:
    """Markdown: per variant and seed, each probe quantity's last paired change with its 95 % interval."""
    lines = ["| variant | seed | " + " | ".join(PROBE_KEYS) + " |", "|---|---:|" + "---:|" * len(PROBE_KEYS)]
    for name, results in runs.items():
        for result in results:
            seed, history = result["seed"], result["history"]
            if f"probe_diff/{PROBE_KEYS['reward sum, post-train']}" not in history:
                continue
            cells = []
            for key in PROBE_KEYS.values():
                values = [history.get(f"probe_diff/{key}{part}", [None])[-1] for part in ("", "/ci_low", "/ci_high")]
                cells.append("-" if None in values else "{:+.4f} [{:+.4f}, {:+.4f}]".format(*values))
            lines.append(f"| {name} | {seed} | " + " | ".join(cells) + " |")
    if len(lines) == 2:
        return ""
    return ("Mean over the probe windows x 4 fixed noises, with its 95 % t-interval over windows "
            "(`probe_diff/...` in each run's history.json); a change is resolved when its interval excludes 0.\n\n"
            + "\n".join(lines) + "\n")


def plot_changes(runs: dict[str, list[dict]], path: Path) -> Path:
    """Per variant: change against the prior of MPJPE and PA-MPJPE (%), one dot per seed, bar = mean."""
    from matplotlib.figure import Figure

    names = list(runs)
    tto_keys = [tto for tto in ("", "+tto") if "base" + tto in runs[names[0]][0]]
    panels = [(m, tto) for tto in tto_keys for m in ("mpjpe_mm", "pa_mpjpe_mm")]
    fig = Figure(figsize=(2 * (0.55 * len(names) + 2.5), 4.5 * len(tto_keys)), layout="constrained")
    axes = fig.subplots(len(tto_keys), 2, squeeze=False).ravel()  # one row per (without, with) TTO
    for ax, (metric, tto) in zip(axes, panels, strict=True):
        for i, name in enumerate(names):
            change = [100.0 * (r["grpo" + tto][metric] / r["base" + tto][metric] - 1.0) for r in runs[name]]
            mean = statistics.mean(change)
            ax.bar(i, mean, color="tab:blue" if mean < 0 else "tab:red", alpha=0.5)
            ax.plot([i] * len(change), change, "k.")
        ax.axhline(0.0, color="k", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=7)
        ax.set_title({"mpjpe_mm": "MPJPE", "pa_mpjpe_mm": "PA-MPJPE"}[metric] + (" + TTO" if tto else ""), fontsize=9)
        ax.set_ylabel("change vs prior, % (lower is better)")
    fig.savefig(path, dpi=110)
    return path


def run_dir(cfg: Config, variant: str, seed: int) -> Path:
    """Where one (variant, seed) run writes: the variant name with non-alphanumerics as '_'."""
    return cfg.output_dir / ("".join(c if c.isalnum() else "_" for c in variant) + f"_seed{seed}")


def config_differences(stored: dict, wanted: dict, defaults: dict) -> list[str]:
    """The entries where a finished run's stored config differs from the one this ablation asks for.

    ``stored``, ``wanted`` and ``defaults`` are JSON-able configs (nested dicts). An entry that the stored
    config lacks (a field added after the run) counts as its default value. Entries in
    ``IGNORED_CONFIG_KEYS`` (paths of the run itself, thread counts) are skipped. Returns
    ``"key: stored -> wanted"`` strings, empty when the run is the one asked for.
    """
    stored, wanted, defaults = _flatten(stored), _flatten(wanted), _flatten(defaults)
    stored = {_renamed(key): value for key, value in stored.items()}
    diffs = []
    for key, value in wanted.items():
        if _ignored(key):
            continue
        before = stored.get(key, defaults.get(key))
        if before != value:
            diffs.append(f"{key}: {before!r} -> {value!r}")
    return diffs


def read_finished(result_file: Path, wanted: dict[str, tuple[dict, dict]]) -> dict | None:
    """A finished run's results.json, or None if there is none.

    ``wanted`` maps a key of the stored ``"config"`` (``""`` for the whole of it) to the (config, defaults)
    the run must have been made with. A stored config that lacks such a key (a run written before the key was
    stored) is read back with a logged warning.

    Raises:
        ValueError: the run there was made with another config than ``wanted`` (e.g. the main job's defaults
            changed since): reading it back would put another experiment's numbers under this row.
    """
    if not result_file.exists():
        return None
    result = json.loads(result_file.read_text())
    diffs = []
    for key, (config, defaults) in wanted.items():
        stored = result.get("config", {})
        stored = stored.get(key) if key else stored
        if not stored:
            logger.warning("%s stores no %s config: read back unchecked", result_file, key or "run")
            continue
        diffs += config_differences(stored, config, defaults)
    if diffs:
        raise ValueError(f"{result_file.parent} holds a finished run made with another config ({'; '.join(diffs)}). "
                         "Use another --output-dir for this ablation, or pass the flags that run was made with "
                         "(e.g. --base.grpo.perturb.scale).")
    return result


def supervised_config(cfg: Config, seed: int, out_dir: Path) -> pretrain.Config:
    """The supervised baseline's pretraining config: the prior, continued on the post-train windows."""
    return pretrain.Config(seed=seed, preset="demo", init_from=cfg.base.prior, train_split="post_train",
                           window_frames=cfg.base.task.window_frames, steps=cfg.supervised_steps,
                           learning_rate=cfg.supervised_learning_rate, warmup_steps=0, output_dir=out_dir,
                           eval_windows=0, num_threads=cfg.base.threads or None, resume=True, use_progress_bar=False)


def evaluation_config(base: ego.Config) -> dict:
    """What the supervised baseline's evaluation depends on (stored with its results and checked on read-back)."""
    values = base.effective()
    return {key: values[key] for key in ("prior", "task", "eval_seed", "eval_max_windows", "use_tto")}


def check_same_prior(runs: dict[str, list[dict]], rel_tol: float = 1e-4) -> None:
    """Every run of one table must report the same prior evaluation (the same prior, data and held-out noise).

    Raises:
        ValueError: two runs' ``"base"`` metrics differ by more than ``rel_tol`` (e.g. the prior file was
            replaced between runs): their changes against the prior would not be comparable.
    """
    reference = None
    for name, results in runs.items():
        for result in results:
            if reference is None:
                reference = (name, result["seed"], result["base"])
                continue
            for metric, value in result["base"].items():
                expected = reference[2].get(metric)
                if expected is not None and not math.isclose(value, expected, rel_tol=rel_tol, abs_tol=1e-9):
                    raise ValueError(
                        f"the prior's {metric} is {value} in ({name}, seed {result['seed']}) but {expected} in "
                        f"({reference[0]}, seed {reference[1]}): these runs were made with different priors or "
                        "data; rerun them into one --output-dir with one prior")


def supervised_baseline(cfg: Config, seed: int, out_dir: Path) -> dict:
    """Continued diffusion training of the prior on the post-train windows, evaluated like a GRPO run."""
    import torch

    from tasks.ego_motion.model.network import load_denoiser

    pre = supervised_config(cfg, seed, out_dir)
    record = pretrain.main(pre)
    torch.set_num_threads(cfg.base.threads or torch.get_num_threads())
    task = ego.EgoMotionTask(cfg.base.task)
    base = ego.evaluate_all(task, load_denoiser(cfg.base.prior), cfg.base)
    post = ego.evaluate_all(task, load_denoiser(out_dir / "denoiser.safetensors"), cfg.base)
    result = {"base": base[""], "grpo": post[""], "train_seconds": record["train_seconds"],
              "config": {"supervised": _as_json(pre), "evaluation": evaluation_config(cfg.base)}}
    if cfg.base.use_tto:
        result.update({"base+tto": base["+tto"], "grpo+tto": post["+tto"]})
    (out_dir / "results.json").write_text(json.dumps(result, indent=2))
    return result


def main(cfg: Config) -> dict:
    """Train (or read back) every (variant, seed) run and write the table, its picture and ablation.json.

    Returns the runs by row name: per seed, its results.json with its history and seed.
    """
    runs: dict[str, list[dict]] = {}
    missing: list[str] = []
    variants = variant_configs(cfg)
    default_effective = ego.Config().effective()
    if "supervised" in cfg.variants:
        evaluation = (evaluation_config(cfg.base), evaluation_config(ego.Config()))
        for seed in cfg.seeds:
            out_dir = run_dir(cfg, "supervised", seed)
            pre = supervised_config(cfg, seed, out_dir)
            result = read_finished(out_dir / "results.json", {
                "supervised": (_as_json(pre), _as_json(pretrain.Config())), "evaluation": evaluation})
            if result is None and cfg.report_only:
                missing.append(f"supervised, seed {seed}")
                continue
            result = result or supervised_baseline(cfg, seed, out_dir)
            runs.setdefault("supervised (continued diffusion training)", []).append(
                {**result, "history": {}, "seed": seed})
    for name, variant in variants.items():
        for seed in cfg.seeds:
            out_dir = run_dir(cfg, name, seed)
            seeded = dataclasses.replace(variant.grpo, seed=seed)
            # resume=True: a run killed part-way continues from its last checkpoint (a fresh start if none)
            run_cfg = dataclasses.replace(variant, output_dir=out_dir, grpo=seeded, resume=True)
            result = read_finished(out_dir / "results.json", {"": (run_cfg.effective(), default_effective)})
            if result is None and cfg.report_only:
                missing.append(f"{name}, seed {seed}")
                continue
            result = result or ego.main(run_cfg)
            history = json.loads((out_dir / "history.json").read_text()) if (out_dir / "history.json").exists() else {}
            runs.setdefault(name, []).append({**result, "history": history, "seed": seed})
    if not runs:
        raise FileNotFoundError(f"no finished run under {cfg.output_dir} to report; run without --report-only.")
    check_same_prior(runs)
    table = render(runs, cfg)
    if missing:
        table = table.replace("## Held-out metrics", "**Not finished yet** (these rows average the seeds that are): "
                              + "; ".join(missing) + ".\n\n## Held-out metrics", 1)
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    cfg.output.write_text(table)
    plot_changes(runs, cfg.output.with_suffix(".png"))
    (cfg.output_dir / "ablation.json").write_text(json.dumps(runs, indent=2, default=str))
    print(table)
    return runs


if __name__ == "__main__":
    with flags_spelled({"--grpo.": "--base.grpo.", "--task.": "--base.task."}):  # the main job's config is --base
        main(cli.parse(Config, renamed=ego.renamed_flags('--base.')))
