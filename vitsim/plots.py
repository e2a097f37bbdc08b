"""Figures of `vitsim compare` (matplotlib, Agg backend) and the markdown report embedding them.

Everything is drawn from the results dict that `vitsim.compare.run` writes to results.json, so a
report can be redrawn from that file alone:

- `cka_a_b.png`, `cka_a_a.png`, `cka_b_b.png`: CKA heatmaps with layers on both axes, layer 0
  at the bottom left (Raghu et al. 2021, Figs. 1-2);
- `attention_distance.png`: mean attention distance per layer, one dot per head (Fig. 3);
- `ratio_of_norms.png`: `‖z‖ / ‖f(z)‖` per residual sub-block, class token vs spatial tokens
  for a ViT, per block for a ResNet (Fig. 7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURES = {
    "cka_a_b": "cka_a_b.png",
    "cka_a_a": "cka_a_a.png",
    "cka_b_b": "cka_b_b.png",
    "attention_distance": "attention_distance.png",
    "ratio_of_norms": "ratio_of_norms.png",
}
MAX_TICKS = 40


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _nan_matrix(rows) -> np.ndarray:
    """Nested lists from results.json (None for NaN/Inf) as a float array."""
    return np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=float)


def _ticks(labels: list[str]) -> tuple[list[int], list[str]]:
    """At most MAX_TICKS evenly spaced tick positions (always including the last layer)."""
    n = len(labels)
    step = max(1, int(np.ceil(n / MAX_TICKS)))
    idx = list(range(0, n, step))
    if idx[-1] != n - 1:
        idx.append(n - 1)
    return idx, [labels[i] for i in idx]


def plot_cka(matrix, row_labels: list[str], col_labels: list[str], path, *, title: str,
             row_name: str, col_name: str) -> None:
    """Heatmap of a `(len(row_labels), len(col_labels))` CKA matrix, rows on the y axis."""
    plt = _pyplot()
    m = np.asarray(matrix, dtype=np.float64)
    fig_w = min(12.0, 4.5 + 0.12 * len(col_labels))
    fig_h = min(11.0, 4.0 + 0.12 * len(row_labels))
    fig, ax = plt.subplots(figsize=(fig_w, fig_h), dpi=110)
    finite = m[np.isfinite(m)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    im = ax.imshow(m, origin="lower", cmap="magma", vmin=vmin, vmax=1.0, aspect="auto",
                   interpolation="nearest")
    for set_ticks, set_labels, labels, rot in ((ax.set_xticks, ax.set_xticklabels, col_labels, 90),
                                               (ax.set_yticks, ax.set_yticklabels, row_labels, 0)):
        pos, names = _ticks(labels)
        set_ticks(pos)
        set_labels(names, rotation=rot, fontsize=7 if len(pos) <= 24 else 5.5)
    ax.set_xlabel(f"{col_name} layer")
    ax.set_ylabel(f"{row_name} layer")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="CKA", fraction=0.046, pad=0.03)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_attention_distance(models: list[dict], path) -> None:
    """Mean attention distance (pixels) per layer, one dot per head, one panel per ViT model."""
    plt = _pyplot()
    vits = [m for m in models if m.get("attention_distance")]
    fig, axes = plt.subplots(1, max(1, len(vits)), figsize=(5.2 * max(1, len(vits)), 4.0), dpi=110,
                             squeeze=False)
    if not vits:
        ax = axes[0, 0]
        ax.text(0.5, 0.5, "no attention layers in either model\n(attention distance applies to ViTs)",
                ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    for ax, m in zip(axes[0], vits):
        att = m["attention_distance"]
        d = _nan_matrix(att["per_head"])
        layers, heads = d.shape
        cmap = plt.get_cmap("viridis")
        for h in range(heads):
            ax.scatter(np.arange(layers), d[:, h], s=14, color=cmap(h / max(1, heads - 1)),
                       label=f"head {h}" if heads <= 16 else None, zorder=3)
        ax.plot(np.arange(layers), np.nanmean(d, axis=1), color="0.6", lw=1, zorder=2, label="mean")
        if m.get("grid") and m.get("patch_size"):
            ax.axhline(uniform_distance(m["grid"], m["patch_size"]), color="0.3", ls=":", lw=1,
                       label="uniform over patches", zorder=1)
        ax.set_xticks(np.arange(layers))
        ax.set_xticklabels([str(i) for i in range(layers)], fontsize=7)
        ax.set_xlabel("block")
        ax.set_ylabel("mean attention distance (pixels)")
        ax.set_title(f"{m['name']}  (patch {m['patch_size']} px, grid {m['grid']})", fontsize=9)
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if heads <= 16:
            ax.legend(fontsize=6, ncol=2, loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def uniform_distance(grid, patch_size: float) -> float:
    """Mean distance (pixels) of a head that attends uniformly to every patch: a reference line."""
    from .reference import patch_positions

    pos = patch_positions(tuple(grid), patch_size)
    return float(np.sqrt(((pos[:, None] - pos[None]) ** 2).sum(-1)).mean())


def plot_ratio_of_norms(models: list[dict], path) -> None:
    """`‖z‖ / ‖f(z)‖` per residual sub-block; class token vs spatial tokens for ViTs."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(models), figsize=(5.2 * len(models), 4.0), dpi=110, squeeze=False)
    for ax, m in zip(axes[0], models):
        rows = m.get("ratio_of_norms") or []
        ax.set_title(m["name"], fontsize=9)
        if not rows:
            ax.text(0.5, 0.5, "no residual blocks captured", ha="center", va="center",
                    transform=ax.transAxes)
            ax.set_axis_off()
            continue

        def values(key):
            return np.array([np.nan if r.get(key) is None else r[key] for r in rows], dtype=float)

        if "spatial" in rows[0]:
            blocks = list(dict.fromkeys(r["block"] for r in rows))
            x = np.array([blocks.index(r["block"]) for r in rows])
            for branch, marker, style in (("attn", "o", "-"), ("mlp", "s", "--")):
                sel = np.array([r["branch"] == branch for r in rows])
                if m.get("class_token"):
                    ax.plot(x[sel], values("cls")[sel], marker=marker, ls=style, color="C3", ms=4,
                            lw=1, label=f"class token, {branch}")
                ax.plot(x[sel], values("spatial")[sel], marker=marker, ls=style, color="C0", ms=4,
                        lw=1, label=f"spatial tokens, {branch}")
            ax.set_xlabel("block (attention and MLP sub-blocks)")
        else:
            x = np.arange(len(rows))
            ax.plot(x, values("ratio"), marker="o", color="C2", ms=4, lw=1,
                    label="block (all positions)")
            ax.set_xlabel("residual block")
        if not any(np.isfinite(values(k)).any() for k in ("cls", "spatial", "ratio")):
            ax.text(0.5, 0.5, "f(z) = 0 in every block: the ratio is infinite\n"
                    "(zero-initialised residual branches?)", ha="center", va="center",
                    transform=ax.transAxes, fontsize=8)
        finite = np.concatenate([values(k) for k in ("cls", "spatial", "ratio")])
        finite = finite[np.isfinite(finite) & (finite > 0)]
        if finite.size and finite.max() / finite.min() > 20:
            ax.set_yscale("log")
        ax.set_ylabel("‖z‖ / ‖f(z)‖")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_figures(results: dict, out) -> dict[str, str]:
    """Draw every figure of a results dict into `out`; returns `{figure key: file name}`."""
    out = Path(out)
    a, b = results["models"]["a"], results["models"]["b"]
    cka = results["cka"]
    est = "unbiased" if results["settings"]["unbiased"] else "biased"
    pairs = {"cka_a_b": (a, b), "cka_a_a": (a, a), "cka_b_b": (b, b)}
    for key, (rows, cols) in pairs.items():
        plot_cka(_nan_matrix(cka[key[4:]]), rows["layers"], cols["layers"], out / FIGURES[key],
                 title=f"minibatch CKA ({est}): {rows['name']} vs {cols['name']}",
                 row_name=rows["name"], col_name=cols["name"])
    plot_attention_distance([a, b], out / FIGURES["attention_distance"])
    plot_ratio_of_norms([a, b], out / FIGURES["ratio_of_norms"])
    return dict(FIGURES)


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}g}"


def report_markdown(results: dict, figures: dict[str, str]) -> str:
    """A short markdown report embedding the figures."""
    a, b = results["models"]["a"], results["models"]["b"]
    s, d = results["settings"], results["data"]
    cka = _nan_matrix(results["cka"]["a_b"])
    lines = [
        f"# vitsim compare: {a['name']} vs {b['name']}",
        "",
        f"{results['cka']['estimator']}, {d['images_used']} images from `{d['source']}` in "
        f"{len(d['batches'])} minibatches of up to {s['batch_size']}; granularity `{s['granularity']}`, "
        f"{s['dtype']} on {s['device']}"
        + (f" ({results['device_name']})" if results["device_name"] not in ("cpu", s["device"])
           else "") + ".",
        "",
        "| model | layers | attention layers | prefix tokens | patch / grid | weights |",
        "|---|---|---|---|---|---|",
    ]
    for m in (a, b):
        weights = m["checkpoint"] or ("pretrained" if s["pretrained"] else "random init")
        acc = (m.get("training") or {}).get("heldout_accuracy")
        if acc is not None:
            weights += f" (held-out accuracy {acc:.3f})"
        geom = f"{m['patch_size']} px / {m['grid']}" if m["patch_size"] else "-"
        lines.append(f"| `{m['name']}` | {len(m['layers'])} | {len(m['attention'])} | "
                     f"{m['num_prefix_tokens']} | {geom} | {weights} |")
    best = np.nanargmax(cka, axis=1) if np.isfinite(cka).any(axis=1).all() else None
    lines += ["", "## CKA between the models", "",
              f"![CKA {a['name']} vs {b['name']}]({figures['cka_a_b']})", ""]
    if best is not None:
        lines.append(f"Most similar `{b['name']}` layer for each `{a['name']}` layer: "
                     + ", ".join(f"{a['layers'][i]} → {b['layers'][j]} ({cka[i, j]:.2f})"
                                 for i, j in enumerate(best) if i % max(1, len(best) // 8) == 0) + ".")
        lines.append("")
    lines += ["## CKA within each model", "",
              f"![CKA {a['name']}]({figures['cka_a_a']}) ![CKA {b['name']}]({figures['cka_b_b']})", "",
              "## Attention distance", "", f"![attention distance]({figures['attention_distance']})", ""]
    for m in (a, b):
        att = m.get("attention_distance")
        if att:
            per_head = _nan_matrix(att["per_head"])
            lines.append(f"`{m['name']}` mean over heads per block (pixels): "
                         + ", ".join(_fmt(v) for v in np.nanmean(per_head, axis=1)) + ".")
            lines.append("")
    lines += ["## Ratio of norms across skip connections", "",
              f"![ratio of norms]({figures['ratio_of_norms']})", "",
              "Numbers: `results.json` (every value, settings, versions) and `results.npz` "
              "(arrays).", ""]
    return "\n".join(lines)
