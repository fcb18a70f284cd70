"""The trade-off benchmark's figures: Fig. 3 (score against measured speed-up, one panel per task, and
``tradeoff.png`` with every task) and Fig. 4 (how often DPBERT runs each layer)."""

from __future__ import annotations

from pathlib import Path

from _common import layer_heatmap
from tradeoff_analysis import LABELS, WINDOW, backbone_title, choose, front, headline

STYLE = {"dpbert": ("o-", "C3"), "dpbert_soft": ("s--", "C1"), "deebert": ("^-", "C0"), "pabee": ("v-", "C2"),
         "berxit": ("D-", "C4"), "layerdrop": ("x-", "C5"), "bert_kl": ("P-", "C7"),
         "oracle": (":", "k"), "static_path": ("+:", "C8")}


def draw_task(ax, t: str, e: dict, title: str, legend: bool = True) -> None:
    """One task's Fig. 3 panel: for every method the best score at each speed-up or faster (a
    staircase through its front) and, faint, every point it measured."""
    ax.axvspan(*WINDOW, color="0.93", zorder=0)
    base = e["methods"].get("backbone", {}).get("points", [])
    if base:
        ax.axhline(base[0]["score"], color="0.5", lw=0.8, ls="--", label="backbone (all layers)")
    for n, (fmt, col) in STYLE.items():
        pts = e["methods"].get(n, {}).get("points", [])
        if not pts:
            continue
        shown = front(pts)
        ax.step([p["speedup_measured"] for p in shown], [p["score"] for p in shown], fmt, where="pre", color=col,
                ms=4, label=LABELS[n], lw=2.2 if n == "dpbert" else 1.1, zorder=3 if n == "dpbert" else 2)
        ax.scatter([p["speedup_measured"] for p in pts], [p["score"] for p in pts], color=col, s=9, alpha=0.3)
        pick = choose(pts, *WINDOW)  # the setting chosen on the selection split (Table 1)
        if pick:
            ax.scatter([pick["speedup_measured"]], [pick["score"]], marker="*", s=70, color=col, edgecolor="k",
                       linewidth=0.5, zorder=4)
    # the y range of the methods; an oracle far above it is marked at the top edge instead of
    # squeezing every method's curve into a sliver
    scores = [p["score"] for n in STYLE if n != "oracle"
              for p in e["methods"].get(n, {}).get("points", [])] + [b["score"] for b in base]
    if scores:
        lo, hi = min(scores), max(scores)
        pad = max(1.0, 0.08 * (hi - lo))
        orc = e["methods"].get("oracle", {}).get("points", [])
        top = max([p["score"] for p in orc] + [hi])
        if top > hi + 4 * pad:
            ax.set_ylim(lo - pad, hi + 2 * pad)
            best = max(orc, key=lambda p: (p["score"], p["speedup_measured"]))
            ax.annotate(f"oracle (dev labels) above: {best['score']:.1f} at {best['layers_executed_mean']:.2f} "
                        f"layers, {best['speedup_measured']:.1f}x", xy=(0.99, 0.985), xycoords="axes fraction",
                        ha="right", va="top", fontsize=7, color="k")
    ax.set_xscale("log")
    ticks = [1, 1.3, 2, 3, 4, 6]
    ax.set_xticks(ticks, [f"{x:g}x" for x in ticks])
    ax.minorticks_off()
    ax.set_xlabel("measured speed-up at batch size 1 (CPU, log scale)")
    ax.set_ylabel(f"dev {e['metric']}")
    ax.set_title(title + (" (noisy timing)" if e.get("noisy") else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if legend:
        ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))


def shared_legend(fig, axes) -> None:
    """One legend on the right for every panel's methods (each label once)."""
    handles = {}
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(lab, h)
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=8)


def plot(results: dict, out_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results.get("tasks", {})
    model = backbone_title(results)
    for t, e in tasks.items():
        fig, ax = plt.subplots(figsize=(8.6, 4.6))
        draw_task(ax, t, e, f"{t}: best dev score at each speed-up or faster ({model}; shaded {WINDOW[0]}-{WINDOW[1]}x; "
                     "star: chosen on the selection split)")
        fig.tight_layout()
        fig.savefig(out_dir / f"tradeoff_{t}.png", dpi=120)
        plt.close(fig)
    if tasks:  # the main figure: every task side by side, one legend
        n = len(tasks)
        cols = min(n, 2)
        rows_n = (n + cols - 1) // cols
        fig, axes = plt.subplots(rows_n, cols, figsize=(6.2 * cols + 2.2, 4.0 * rows_n), squeeze=False)
        for ax, (t, e) in zip(axes.flat, tasks.items()):
            draw_task(ax, t, e, t, legend=False)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        shared_legend(fig, axes)
        fig.suptitle(f"Best dev score at each batch-1 speed-up or faster, {model} on CPU "
                     f"(shaded: {WINDOW[0]}-{WINDOW[1]}x)", fontsize=11)
        fig.tight_layout(rect=(0, 0, 1 - 2.0 / (6.2 * cols + 2.2), 0.96))
        fig.savefig(out_dir / "tradeoff.png", dpi=110)
        plt.close(fig)
    rows = [(t, headline(e)) for t, e in tasks.items() if headline(e)]
    if rows:  # Fig. 4
        layer_heatmap([f"{t} ({p['speedup_measured']:.2f}x)" for t, p in rows], [p["layer_frequency"] for _, p in rows],
                      out_dir / "tradeoff_layers.png", "DPBERT: fraction of dev inputs that execute each layer")


def plot_device(device: dict, path: Path) -> None:
    """Score against the speed-up measured on another device (``--retime``), one panel per task and
    batch size; the grey line is the full backbone's speed (1x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks, bss = device.get("tasks", {}), device.get("batch_sizes", [])
    if not tasks or not bss:
        return
    fig, axes = plt.subplots(len(tasks), len(bss), figsize=(5.2 * len(bss) + 2.2, 3.8 * len(tasks)), squeeze=False)
    for row, (t, e) in zip(axes, tasks.items()):
        for ax, bs in zip(row, bss):
            ax.axvline(1.0, color="0.5", lw=0.8, ls="--")
            for n, (fmt, col) in STYLE.items():
                pts = sorted(e["methods"].get(n, {}).get("points", []), key=lambda p: p[f"speedup_measured_b{bs}"])
                if pts and n != "oracle":
                    ax.plot([p[f"speedup_measured_b{bs}"] for p in pts], [p["score"] for p in pts], fmt[0],
                            color=col, ms=4, label=LABELS[n], alpha=0.85)
            ax.set_xlabel(f"measured speed-up, batch {bs}, {device.get('device_name')}")
            ax.set_ylabel("dev score")
            ax.set_title(f"{t}, batch {bs}", fontsize=10)
            ax.grid(alpha=0.3)
    shared_legend(fig, axes)
    fig.suptitle(f"The trade-off benchmark's models on {device.get('device_name')} (left of the dashed line: "
                 "slower than the full backbone)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 2.0 / (5.2 * len(bss) + 2.2), 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
