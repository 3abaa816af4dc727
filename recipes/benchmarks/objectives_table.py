"""The objectives comparison table of docs/objectives.md, generated from the results files of
``recipes/benchmarks/objectives.py`` (``docs/data/objectives_<task>_<objective>_seed<seed>.json``).

    python -m recipes.benchmarks.objectives_table     # rewrites the marked block of docs/objectives.md

Per task and objective, over seeds: the probe reward's paired gain over the prior at fixed fractions of the
training CPU budget and the same-condition gradient cosine at the prior, each as the mean with a 95 % t-interval
over seeds (the cosine's interval clipped to [-1, 1]), and per seed the training CPU seconds at which it first
reaches the best existing objective's final gain. Then the verdict of issue 21's criterion: a new objective
(NFT, AWM) reaches the best existing objective's (ratio, x0 regression) final probe gain in at most a third of
the CPU time that objective needed. The gain is the total reward of the split each task trains on (``train``;
the ego task's ``post_train``). For the tasks whose probe also holds the validation MPJPE (the ego task), a second
table gives its paired change at the same marks.

The verdict compares budget fractions, not the snapshots' CPU seconds: a mark's snapshot is the iteration whose
CPU seconds are nearest the mark (``recipes/benchmarks/objectives.py``), so its CPU seconds lie up to half an
iteration either side of it, and two objectives' snapshots at the same mark can fall on either side of a third of
the other's time. Every run of a task has the same budget, so the marks are the same CPU seconds for all of them:
a new objective meets the criterion when the first mark at which its mean gain reaches the target is at most a
third of the best existing objective's first such mark.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import tyro

from diffgrpo.probe import t_quantile_975

EXISTING = ("ratio", "x0_regression")
NEW = ("nft", "awm")
TASKS = {"shapes": "shapes", "text_to_image": "text-to-image (tiny SD3)", "ego_motion": "ego-motion"}
TRAIN_SPLITS = {"ego_motion": "post_train"}
"""The split each task trains on and probes, where it is not 'train' (the ego task's GRPO windows are post_train)."""
GAIN = "probe_diff/reward/train/total"
VALIDATION = "metric/validation/mpjpe_mm"
"""A held-out quantity shown in its own table for the tasks whose probe carries it (the ego task's selection metric)."""
SHOWN_MARKS = (1 / 9, 1 / 3, 2 / 3, 1.0)
BEGIN, END = "<!-- objectives-table:begin -->", "<!-- objectives-table:end -->"


@dataclass(frozen=True)
class Interval:
    """Mean over seeds and its 95 % t-interval (the half-width is nan for one seed)."""

    mean: float
    half_width: float
    n: int

    @staticmethod
    def of(values: list[float]) -> Interval:
        if not values:
            raise ValueError("an interval needs at least one value")
        n = len(values)
        half = t_quantile_975(n - 1) * statistics.stdev(values) / math.sqrt(n) if n > 1 else math.nan
        return Interval(statistics.fmean(values), half, n)

    def text(self, digits: int = 3, sign: str = "+", within: tuple[float, float] = (-math.inf, math.inf)) -> str:
        """``mean [low, high]``, the interval clipped to ``within`` (the range the quantity can take)."""
        form = f"{sign}.{digits}f"
        if math.isnan(self.half_width):
            return f"{self.mean:{form}}"
        low, high = max(self.mean - self.half_width, within[0]), min(self.mean + self.half_width, within[1])
        return f"{self.mean:{form}} [{low:{form}}, {high:{form}}]"


def load(folder: Path) -> dict[tuple[str, str], list[dict]]:
    """Results files by (task, objective), each list sorted by seed."""
    runs: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for path in sorted(folder.glob("objectives_*_seed*.json")):
        result = json.loads(path.read_text())
        runs[result["task"], result["objective"]].append(result)
    for results in runs.values():
        results.sort(key=lambda r: r["seed"])
    return dict(runs)


def gain_key(task: str) -> str:
    """The probe key of the gain: the paired difference of the total reward on the task's train split."""
    return GAIN.replace("/train/", f"/{TRAIN_SPLITS.get(task, 'train')}/")


def mark_row(result: dict, fraction: float) -> dict:
    rows = [m for m in result["probe"]["marks"] if math.isclose(m["fraction"], fraction, rel_tol=1e-9)]
    if len(rows) != 1:
        raise ValueError(f"{result['task']} {result['objective']} seed {result['seed']} has no probe at fraction "
                         f"{fraction:.4f} of its budget; rerun it with the default --marks")
    return rows[0]


def gain_curve(results: list[dict], key: str | None = None) -> list[tuple[float, Interval, Interval]]:
    """Per mark of the first result: (fraction, training CPU seconds over seeds, ``key`` over seeds; default
    ``key``: the gain, :func:`gain_key`)."""
    key = key or gain_key(results[0]["task"])
    out = []
    for mark in results[0]["probe"]["marks"]:
        rows = [mark_row(r, mark["fraction"]) for r in results]
        out.append((mark["fraction"], Interval.of([r["train_cpu_s"] for r in rows]),
                    Interval.of([r[key] for r in rows])))
    return out


def first_reach(curve: list[tuple[float, Interval, Interval]], target: float) -> float | None:
    """Budget fraction of the first mark whose mean gain over seeds reaches ``target`` (None: never)."""
    return next((fraction for fraction, _, gain in curve if gain.mean >= target), None)


def within_a_third(fraction: float | None, best_fraction: float) -> bool:
    """Whether a new objective's first reaching mark is at most a third of the best existing objective's (the
    marks are exact fractions such as 1/9 and 1/3, compared as such: 1/9 <= (1/3) / 3 holds)."""
    if fraction is None:
        return False
    return Fraction(fraction).limit_denominator(1000) <= Fraction(best_fraction).limit_denominator(1000) / 3


def seeds_reaching(results: list[dict], target: float) -> list[float | None]:
    """Per seed, the training CPU seconds of its first mark with gain >= ``target`` (None: not by the budget)."""
    return [next((m["train_cpu_s"] for m in r["probe"]["marks"] if m[gain_key(r["task"])] >= target), None)
            for r in results]


def task_budget(task: str, present: dict[str, list[dict]]) -> float:
    """The training CPU budget shared by every run of ``task``; the marks are comparable only if it is shared."""
    budgets = {r["budget_cpu_s"] for results in present.values() for r in results}
    if len(budgets) != 1:
        raise ValueError(f"{task}: the runs have different budgets {sorted(budgets)} CPU s; rerun them with one "
                         "--budget-cpu-s so that equal marks are equal CPU time")
    return budgets.pop()


def task_section(task: str, runs: dict[tuple[str, str], list[dict]]) -> tuple[list[str], str]:
    """The table rows of one task and its verdict sentence."""
    present = {obj: runs[task, obj] for obj in (*EXISTING, *NEW) if (task, obj) in runs}
    curves = {obj: gain_curve(results) for obj, results in present.items()}
    final = {obj: curve[-1][2] for obj, curve in curves.items()}
    existing = [obj for obj in EXISTING if obj in present]
    if not existing:
        raise ValueError(f"{task}: no results of an existing objective ({', '.join(EXISTING)}) to compare with")
    best = max(existing, key=lambda obj: final[obj].mean)
    target = final[best].mean
    budget = task_budget(task, present)
    best_reach = first_reach(curves[best], target)
    iterations = {obj: statistics.fmean(mark_row(r, 1.0)["iteration"] for r in results)
                  for obj, results in present.items()}
    rows = []
    for obj, results in present.items():
        curve = curves[obj]
        gains = [next(g for f, _, g in curve if math.isclose(f, fraction)).text() for fraction in SHOWN_MARKS]
        reach = seeds_reaching(results, target)
        reach_text = ", ".join("—" if cpu is None else f"{cpu:.0f}" for cpu in reach)
        cosine = Interval.of([r["grad_cosine"] for r in results]).text(within=(-1.0, 1.0))
        rows.append(f"| {TASKS[task]} | {obj} | {len(results)} | {cosine} | {curve[-1][1].mean:.0f} | "
                    f"{iterations[obj]:.0f} | " + " | ".join(gains) + f" | {reach_text} |")
    verdicts = []
    new = [obj for obj in NEW if obj in present]
    for obj in new:
        reach = first_reach(curves[obj], target)
        speed = f"{iterations[obj] / iterations[best]:.1f} times as many iterations as {best} in the budget"
        if reach is None:
            verdicts.append(f"{obj} does not reach it within the budget (final gain {final[obj].text()}; {speed})")
        else:
            verdicts.append(f"{obj} reaches it at {mark_text(reach, budget)}, {reach / best_reach:.2f} of {best}'s "
                            f"time ({'within' if within_a_third(reach, best_reach) else 'more than'} a third; "
                            f"{speed})")
    met = any(within_a_third(first_reach(curves[obj], target), best_reach) for obj in new)
    verdict = (f"**{TASKS[task]}: criterion {'met' if met else 'not met'}.** The best existing objective is {best}, "
               f"final gain {final[best].text()}, first reached by the mean over seeds at "
               f"{mark_text(best_reach, budget)}" + "".join(f"; {v}" for v in verdicts) + ".")
    return rows, verdict


def render(runs: dict[tuple[str, str], list[dict]], source: str) -> str:
    """The markdown block: the table, the tasks not measured, and one verdict per task."""
    header = ("| task | objective | seeds | gradient cosine at the prior | CPU s at the full budget | iterations | "
              + " | ".join(f"gain at {fraction_text(f)} budget" for f in SHOWN_MARKS)
              + " | CPU s to reach the best existing objective's final gain, per seed |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    verdicts = []
    for task in TASKS:
        if any(key[0] == task for key in runs):
            rows, verdict = task_section(task, runs)
            lines += rows
            verdicts.append(verdict)
        else:
            lines.append(f"| {TASKS[task]} | all | 0 | not measured (no results files) |"
                         + " |" * (header.count("|") - 5))
    tasks_met = sum("criterion met" in v for v in verdicts)
    summary = (f"Issue 21's criterion (on at least two tasks a new objective reaches the best existing objective's "
               f"probe gain in at most a third of its CPU time) is **{'met' if tasks_met >= 2 else 'not met'}**: "
               f"met on {tasks_met} of {len(verdicts)} measured tasks.")
    return (f"Generated by `python -m recipes.benchmarks.objectives_table` from `{source}`. Gains: the probe's "
            "paired difference to the prior (the train split's total reward; ego-motion: post_train), mean over "
            "seeds [95 % t-interval over seeds]; "
            "cosine intervals clipped to [-1, 1]; CPU s: training CPU seconds of one thread, probes excluded. Last "
            "column: per seed (0, 1, 2, ...), the CPU seconds of its first probe at or above the best existing "
            "objective's mean final gain (—: not by the budget). The verdicts use the curves of the means over "
            "seeds and compare the marks (fractions of the budget, the same CPU seconds for every objective of a "
            "task), not the snapshots' CPU seconds, which lie up to half an iteration either side of a mark.\n\n"
            + "\n".join(lines) + "\n\n" + "\n\n".join(verdicts) + "\n\n" + summary + "\n"
            + validation_table(runs))


def validation_table(runs: dict[tuple[str, str], list[dict]]) -> str:
    """For the tasks whose probe carries ``VALIDATION``: its value at the prior and its paired change at the shown
    marks, mean over seeds [95 % t-interval over seeds]; empty when no task does."""
    keyed = {key: results for key, results in runs.items()
             if all("probe_diff/" + VALIDATION in m for r in results for m in r["probe"]["marks"])}
    if not keyed:
        return ""
    header = (f"| task | objective | seeds | `{VALIDATION}` at the prior | "
              + " | ".join(f"change at {fraction_text(f)} budget" for f in SHOWN_MARKS) + " |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for task in TASKS:
        for obj in (*EXISTING, *NEW):
            if (task, obj) not in keyed:
                continue
            results = keyed[task, obj]
            curve = gain_curve(results, "probe_diff/" + VALIDATION)
            prior = Interval.of([r["probe"]["prior"]["probe/" + VALIDATION] for r in results])
            changes = [next(g for f, _, g in curve if math.isclose(f, fraction)).text(digits=2)
                       for fraction in SHOWN_MARKS]
            lines.append(f"| {TASKS[task]} | {obj} | {len(results)} | {prior.mean:.2f} | " + " | ".join(changes) + " |")
    return (f"\nThe held-out probe quantity `{VALIDATION}` (the validation split; lower is better), the same "
            "snapshots: its paired change to the prior, mean over seeds [95 % t-interval over seeds].\n\n"
            + "\n".join(lines) + "\n")


def fraction_text(fraction: float) -> str:
    return "the full" if fraction == 1 else f"{Fraction(fraction).limit_denominator(9)} of the"


def mark_text(fraction: float, budget: float) -> str:
    """'the 1/3 mark (30 of 90 CPU s)', 'the full budget (90 CPU s)'."""
    if fraction == 1:
        return f"the full budget ({budget:.0f} CPU s)"
    return f"the {Fraction(fraction).limit_denominator(9)} mark ({fraction * budget:.0f} of {budget:.0f} CPU s)"


def write_block(doc: Path, block: str) -> None:
    """Replace the text between the BEGIN and END markers of ``doc`` with ``block``."""
    text = doc.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{doc} lacks the markers {BEGIN} ... {END} that delimit the generated table")
    head, rest = text.split(BEGIN, 1)
    doc.write_text(head + BEGIN + "\n" + block + END + rest.split(END, 1)[1])


def main(data: Path = Path("docs/data"), doc: Path = Path("docs/objectives.md")) -> str:
    """Rewrite the generated block of ``doc`` from the results files in ``data``."""
    block = render(load(data), f"{data}/objectives_*_seed*.json")
    write_block(doc, block)
    return block


if __name__ == "__main__":
    print(tyro.cli(main))
