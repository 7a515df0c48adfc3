"""Dependency-free SVG line plots (loss curves) for the results page."""
from __future__ import annotations

import csv
import math

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def read_loss(path: str, smooth: int = 25) -> tuple[list[int], list[float]]:
    steps, losses = [], []
    with open(path) as f:
        for row in csv.DictReader(f):
            steps.append(int(row["step"]))
            losses.append(float(row["loss"]))
    out = []
    for i in range(len(losses)):  # trailing moving average: raw flow-matching losses are noisy
        window = losses[max(0, i - smooth + 1):i + 1]
        out.append(sum(window) / len(window))
    return steps, out


def loss_svg(curves: dict[str, tuple[list[int], list[float]]], title: str, width: int = 640,
             height: int = 360, log_y: bool = False) -> str:
    """log_y: a log scale, where late differences of a few hundredths stay visible beside a start near 1."""
    left, right, top, bottom = 60, 180, 30, 40
    if log_y:
        curves = {k: (s, [math.log10(y) if y > 0 else math.nan for y in l]) for k, (s, l) in curves.items()}
    xs = [x for s, _ in curves.values() for x in s]
    ys = [y for _, l in curves.values() for y in l if math.isfinite(y)]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or 0.1
    y0, y1 = y0 - pad, y1 + pad
    sx = lambda x: left + (x - x0) / max(1, x1 - x0) * (width - left - right)
    sy = lambda y: top + (1 - (y - y0) / (y1 - y0)) * (height - top - bottom)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
             f'font-size="12"><rect width="100%" height="100%" fill="white"/>',
             f'<text x="{left}" y="18" font-size="14">{title}</text>',
             f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" stroke="black"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>']
    for i in range(5):
        y = y0 + (y1 - y0) * i / 4
        label = f"{10 ** y:.3g}" if log_y else f"{y:.3f}"
        parts.append(f'<text x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{label}</text>')
        x = x0 + (x1 - x0) * i / 4
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 16}" text-anchor="middle">{int(x)}</text>')
    parts.append(f'<text x="{(left + width - right) / 2}" y="{height - 6}" text-anchor="middle">step</text>')
    for k, (name, (s, l)) in enumerate(curves.items()):
        color = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(s, l) if math.isfinite(y))
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{pts}"/>')
        ly = top + 14 * k + 6
        parts.append(f'<line x1="{width - right + 10}" y1="{ly}" x2="{width - right + 30}" y2="{ly}" '
                     f'stroke="{color}" stroke-width="2"/>')
        parts.append(f'<text x="{width - right + 34}" y="{ly + 4}">{name}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def main(argv=None) -> None:
    """python -m evaluation.plots OUT.svg NAME=loss.csv [NAME=loss.csv ...]"""
    import sys
    args = argv if argv is not None else sys.argv[1:]
    out, runs = args[0], [a.split("=", 1) for a in args[1:]]
    with open(out, "w") as f:
        f.write(loss_svg({name: read_loss(path) for name, path in runs},
                         "Flow-matching loss (moving average of 25 steps)"))


if __name__ == "__main__":
    main()
