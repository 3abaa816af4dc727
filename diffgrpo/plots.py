"""Training curves as PNG: rewards, group spread, zero-std fraction, diversity, ratios.

Why pictures: whether GRPO is learning or stalling (collapsed groups, vanishing advantages)
is seen at a glance in these curves, not in a column of numbers.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

PANELS: tuple[tuple[str, str], ...] = (
    ("probe_diff/reward/", "probe set: paired change vs. before training (95 % CI)"),
    ("reward/", "sub-rewards (mean over samples)"),
    ("adv/group_std/", "mean within-group std per sub-reward"),
    ("adv/zero_std_frac", "fraction of zero-std groups"),
    ("diversity/", "intra-group sample diversity"),
    ("loss/ratio_max_dev", "max |ratio - 1|"),
    ("loss/loss", "GRPO loss"),
)


def plot_history(history: dict[str, list[float]], path: str | Path, *, title: str = "") -> Path:
    """Write one panel per group of logged keys (see ``PANELS``) to ``path``; skips empty groups."""
    panels = [(prefix, label, sorted(k for k in history if k.startswith(prefix))) for prefix, label in PANELS]
    panels = [p for p in panels if p[2]]
    if not panels:
        raise ValueError(f"history has none of the plotted keys {[p for p, _ in PANELS]}; got {sorted(history)}")
    cols = min(3, len(panels))
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), layout="constrained")
    for i, (prefix, label, keys) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        if prefix.startswith("probe_diff/"):  # one point per probe evaluation, with its interval
            keys = [k for k in keys if k.endswith("/total") and not k.endswith("/ci_low")]
            x = history["probe/iteration"]
            for key in keys:
                ax.plot(x, history[key], marker="o", label=key[len(prefix):])
                ax.fill_between(x, history[key + "/ci_low"], history[key + "/ci_high"], alpha=0.2)
            ax.axhline(0.0, color="grey", linewidth=0.8)
        for key in [] if prefix.startswith("probe_diff/") else keys:
            values = history[key]
            ax.plot(range(1, len(values) + 1), values, label=key[len(prefix):].lstrip("/") or key)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=7)
        if len(keys) > 1:
            ax.legend(fontsize=6)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
