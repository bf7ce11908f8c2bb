"""``mblm-plot <run dir or loss.csv>... [-o out.png]``: training and validation curves (bits per
element = loss / ln 2) from the CSV loss logs of one or more runs. Needs matplotlib
(``pip install matplotlib``)."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

from mblm.cli._common import fail


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mblm-plot", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run directories or loss.csv files")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="PNG file (default: loss.png in the first run directory)",
    )
    p.add_argument(
        "--x",
        choices=["elements", "batch"],
        default="elements",
        help="x axis: elements seen or cumulative batch index",
    )
    return p


def read_curves(path: Path, x_axis: str) -> dict[str, tuple[list[float], list[float]]]:
    """kind -> (x values, bits per element) of one loss.csv (rows of global rank 0 only)."""
    csv_file = path / "loss.csv" if path.is_dir() else path
    if not csv_file.is_file():
        fail(f"{csv_file} does not exist")
    curves: dict[str, tuple[list[float], list[float]]] = {}
    with csv_file.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        needed = {"kind", "loss", "elements_seen", "cum_batch", "gpu_rank"}
        if reader.fieldnames is None or not needed <= set(reader.fieldnames):
            fail(f"{csv_file} is not an mblm loss log (columns {sorted(needed)} expected)")
        for row in reader:
            if row["kind"] not in ("train", "valid") or row["gpu_rank"] != "0":
                continue
            x = float(row["elements_seen"] if x_axis == "elements" else row["cum_batch"])
            xs, ys = curves.setdefault(row["kind"], ([], []))
            xs.append(x)
            ys.append(float(row["loss"]) / math.log(2))
    if not curves:
        fail(f"{csv_file} has no train or valid rows")
    return curves


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        fail("mblm-plot needs matplotlib: pip install matplotlib", code=1)

    runs = [Path(r) for r in args.runs]
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        label = (run if run.is_dir() else run.parent).name
        for kind, (xs, ys) in read_curves(run, args.x).items():
            style = "-" if kind == "valid" else ":"
            ax.plot(
                xs,
                ys,
                style,
                marker="o" if kind == "valid" else None,
                ms=3,
                label=f"{label} {kind}",
            )
    ax.set_xlabel("elements seen" if args.x == "elements" else "batch")
    ax.set_ylabel("bits per element (loss / ln 2)")
    ax.grid(alpha=0.3)
    ax.legend()
    first = runs[0] if runs[0].is_dir() else runs[0].parent
    output = Path(args.output) if args.output else first / "loss.png"
    fig.tight_layout()
    fig.savefig(output, dpi=120)
    print(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
