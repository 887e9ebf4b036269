"""Draw docs/figures/losses.png: target-logit curves and two-class decision margins.

Left: psi(theta) of each loss (the target logit is s*psi; a non-target logit is s*cos).
Right: the angular gap between the two decision boundaries of two classes whose centres are
phi apart. Class 1's boundary solves psi(cos t) = cos(phi - t); the margin is phi - 2t.

    python docs/figures/plot_losses.py [--out docs/figures/losses.png]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from partialfc.losses import ArcFace, CombinedMargin, CosFace, NormFace, X2Softmax  # noqa: E402

LOSSES = {
    "NormFace": NormFace(),
    "CosFace m=0.35": CosFace(m=0.35),
    "ArcFace m=0.5": ArcFace(m=0.5),
    "Combined (1, 0.3, 0.2)": CombinedMargin(m1=1.0, m2=0.3, m3=0.2),
    "Combined (0.9, 0.4, 0.15)": CombinedMargin(m1=0.9, m2=0.4, m3=0.15),
    "X2 (a=-0.9, h=0, k=0.65)": X2Softmax(),
}


def psi_of_angle(loss, theta: np.ndarray) -> np.ndarray:
    return loss.psi(torch.cos(torch.as_tensor(theta, dtype=torch.float64))).numpy()


def decision_margin(loss, phi: float) -> float:
    """Two-class angular decision margin (radians) for centres ``phi`` apart: bisection on
    ``psi(cos t) - cos(phi - t)``, which decreases on ``[0, phi/2]`` (psi is monotone)."""
    lo, hi = 0.0, phi / 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if psi_of_angle(loss, np.array([mid]))[0] > math.cos(phi - mid):
            lo = mid
        else:
            hi = mid
    return phi - 2 * lo


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("losses.png"))
    args = parser.parse_args()
    theta = np.linspace(0.0, math.pi, 721)
    phis = np.radians(np.arange(60, 181, 2))
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for name, loss in LOSSES.items():
        left.plot(np.degrees(theta), psi_of_angle(loss, theta), label=name)
        right.plot(np.degrees(phis), [math.degrees(decision_margin(loss, p)) for p in phis], label=name)
    left.set(xlabel="angle to own centre theta (deg)", ylabel="psi(theta)  (target logit / s)",
             title="Target-logit transforms", xlim=(0, 180), ylim=(-3.0, 1.1))
    left.annotate("X2 reaches -8.2 at 180", xy=(115, -2.9), fontsize=8)
    right.set(xlabel="angle between the two class centres (deg)", ylabel="decision margin (deg)",
              title="Two-class angular decision margin", xlim=(60, 180))
    for ax in (left, right):
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
