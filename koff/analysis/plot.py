"""Per-layer plot of a LAPE analysis: removal rates of specific / general / all neurons, and counts."""

from __future__ import annotations

from pathlib import Path

from koff.io import atomic_path


def plot_removal_by_layer(rates: dict, path: str | Path, title: str = "") -> None:
    """Write a PNG of ``removal_rates(...)["per_layer"]``: rates on top, class sizes below.

    Needs matplotlib (``pip install 'koff[plots]'``); uses the Agg backend, so no display is needed.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    per_layer = rates["per_layer"]
    layers = [row["layer"] for row in per_layer]

    def series(key: str) -> list[float]:
        return [float("nan") if row[key] is None else row[key] for row in per_layer]

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=[2, 1])
    top.plot(layers, series("specific"), "o-", color="tab:red", label=f"language-specific ({rates['n_specific']})")
    top.plot(layers, series("general"), "s-", color="tab:blue", label=f"language-general ({rates['n_general']})")
    top.plot(layers, series("all"), "k--", label=f"all neurons ({rates['n_all']})")
    top.set_ylabel("fraction removed by the mask")
    top.set_ylim(bottom=0)
    top.legend(loc="best", fontsize=8)
    top.set_title(title or "FFN neurons removed by the shared mask, per layer")
    width = 0.4
    bottom.bar([x - width / 2 for x in layers], series("n_specific"), width, color="tab:red", label="specific")
    bottom.bar([x + width / 2 for x in layers], series("n_general"), width, color="tab:blue", label="general")
    bottom.set_ylabel("neurons")
    bottom.set_xlabel("layer")
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def plot_sparsity_sweep(sweep: dict[str, dict[float, float]], path: str | Path, title: str = "") -> None:
    """Write a PNG of perplexity ratio to dense (geometric mean over domains) against sparsity.

    ``sweep`` maps a configuration name (e.g. "KOFF", "mask, no memories", "prune, then LoRA") to
    {sparsity: ratio}. A log y axis, so that collapse and near-parity both stay readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    # Distinct line styles and shrinking markers: series that coincide (a learned mask equal to the
    # one-shot mask) stay visible on top of each other.
    styles = ["o-", "s--", "d-", "^-.", "x:"]
    for i, (name, points) in enumerate(sweep.items()):
        xs = sorted(points)
        ax.plot([100 * x for x in xs], [points[x] for x in xs], styles[i % len(styles)], label=name,
                markersize=max(8 - 1.5 * i, 3))
    ax.axhline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("sparsity (% of transformer-block parameters removed)")
    ax.set_ylabel("perplexity / dense (geometric mean over domains)")
    ax.set_title(title or "Quality against sparsity")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
