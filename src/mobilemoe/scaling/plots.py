"""Figures of a fit: fit vs data, residuals, iso-loss contours over (active params, tokens)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_fit(result, table, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from mobilemoe.scaling.fit import _columns

    law = result.to_law()
    cols = _columns(table)
    sparsity = cols.get("sparsity", np.ones_like(cols["params"]))
    keys = _group_keys(result, table)
    predicted = np.array([law.form.predict(result.groups[k].coefficients,
                                           {"params": cols["params"][i:i + 1], "tokens": cols["tokens"][i:i + 1],
                                            "sparsity": sparsity[i:i + 1]})[0] if k in result.groups else np.nan
                          for i, k in enumerate(keys)])
    written = []

    fig, ax = plt.subplots(figsize=(6, 5))
    for key in sorted(set(keys)):
        mask = np.array([k == key for k in keys])
        ax.scatter(cols["loss"][mask], predicted[mask], s=12, label=key)
    lo = np.nanmin([cols["loss"].min(), np.nanmin(predicted)])
    hi = np.nanmax([cols["loss"].max(), np.nanmax(predicted)])
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set(xlabel="measured loss", ylabel="predicted loss", title=f"{law.form.name} fit vs data")
    ax.legend(fontsize=7)
    fig.tight_layout()
    written.append(out / f"{law.form.name}_fit_vs_data.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(cols["params"], np.log(predicted) - np.log(cols["loss"]), s=10)
    ax.axhline(0, color="k", lw=1)
    ax.set(xscale="log", xlabel="active parameters", ylabel="log predicted - log measured", title="residuals")
    fig.tight_layout()
    written.append(out / f"{law.form.name}_residuals.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    key = next(iter(result.groups))
    n = np.logspace(np.log10(cols["params"].min()) - 0.5, np.log10(cols["params"].max()) + 0.5, 80)
    d = np.logspace(np.log10(cols["tokens"].min()) - 0.5, np.log10(cols["tokens"].max()) + 0.5, 80)
    nn, dd = np.meshgrid(n, d)
    grid = law.form.predict(result.groups[key].coefficients, {"params": nn.ravel(), "tokens": dd.ravel(),
                                                                "sparsity": np.ones(nn.size)}).reshape(nn.shape)
    fig, ax = plt.subplots(figsize=(6, 5))
    contours = ax.contour(nn, dd, grid, levels=12)
    ax.clabel(contours, fontsize=7)
    ax.scatter(cols["params"], cols["tokens"], s=8, color="k")
    ax.set(xscale="log", yscale="log", xlabel="active parameters N", ylabel="training tokens D",
           title=f"iso-loss contours ({key})")
    fig.tight_layout()
    written.append(out / f"{law.form.name}_isoloss.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def _group_keys(result, table) -> list[str]:
    from mobilemoe.scaling.laws import DENSE_GROUP, group_key

    if "experts" not in table or result.law.name == "chinchilla":
        return [next(iter(result.groups))] * len(table)
    return [DENSE_GROUP if e <= 1 else group_key(int(g), int(k), bool(s))
            for e, g, k, s in zip(table["experts"], table["granularity"], table["top_k"], table["shared"],
                                  strict=True)]
