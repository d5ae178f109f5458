"""Plot the four eps placements near zero: output and gradient against the norm.

Run ``python docs/plot_eps_placements.py [OUT.png]``; the docs build runs it too
(docs/hooks.py) and writes the picture straight into the built site, never into ``docs/``.
Every curve comes from l2norm's reference, for a one-element slice (``y = x / d(|x|)``),
with eps = 1e-2 so the regimes are visible.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from l2norm import EPS_MODES, l2_normalize, l2_normalize_vjp  # noqa: E402

EPS = 1e-2


def main(out: Path) -> Path:
    """Draw the figure into ``out`` (a PNG file; its folder is made)."""
    norms = np.logspace(-5, 1, 400)
    x = norms[:, None]  # one slice per row, one element each: n = x
    fig, (ax_y, ax_g) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for mode in EPS_MODES:
        y = l2_normalize(x, eps=EPS, eps_mode=mode)[:, 0]
        dx, _ = l2_normalize_vjp(x, None, np.ones_like(x), eps=EPS, eps_mode=mode)
        ax_y.plot(norms, y, label=mode)
        ax_g.plot(norms, dx[:, 0], label=mode)
    ax_y.set(xscale="log", xlabel="norm n", ylabel="output x / d(n)", title=f"forward, eps={EPS}")
    ax_g.set(
        xscale="log",
        yscale="log",
        xlabel="norm n",
        ylabel="d output / d x",
        title="gradient (one-element slice)",
    )
    ax_y.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


if __name__ == "__main__":
    import sys

    print(main(Path(sys.argv[1] if len(sys.argv) > 1 else "eps_placements.png")))
