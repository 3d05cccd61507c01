#!/usr/bin/env python3
"""Plots for an mma-bench run: bandwidth vs size (native, mma, ceiling; dashed:
4 copies in flight, native and mma, where bench.csv has those columns) per
direction from bench.csv, and per-path throughput over time under contention
from scenarios.csv ("share" rows: cumulative bytes per path, sampled).

    python3 bench/plot.py RESULTS_DIR     # writes RESULTS_DIR/*.png
"""
import csv
import os
import sys
from collections import defaultdict

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def bandwidth(d):
    path = os.path.join(d, "bench.csv")
    if not os.path.exists(path):  # a scenarios-only run
        return
    rows = list(csv.reader(open(path)))[1:]
    card = rows[0][0] if rows else "?"
    ceil = {r[2]: float(r[6]) for r in rows if r[1] == "ceiling"}
    for dirn in ("H2D", "D2H"):
        pts = [r for r in rows if r[1] == "size" and r[2] == dirn]
        if not pts:
            continue
        size = [int(r[3]) for r in pts]
        nat = [float(r[5]) for r in pts]
        mma = [float(r[6]) for r in pts]
        auto = [float(r[8].split("auto ")[1].split()[0]) if "auto " in r[8] else None for r in pts]

        def column(col):  # a column newer runs fill from 1 MiB: (sizes, values) where it has one
            q = [(s, float(r[col])) for s, r in zip(size, pts) if len(r) > col and r[col] and float(r[col]) > 0]
            return [s for s, _ in q], [v for _, v in q]

        natq, mmaq = column(9), column(10)  # natq_gbps, mmaq_gbps
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax.plot(size, nat, "o-", label="native cudaMemcpyAsync (one link)")
        ax.plot(size, mma, "s-", label="mma through mmad (all paths)")
        if all(a is not None for a in auto):
            ax.plot(size, auto, "^--", label="mma as used (native below bypass)")
        if natq[0]:
            ax.plot(*natq, "o--", color="C0", alpha=0.7, label="native, 4 copies in flight")
        if mmaq[0]:
            ax.plot(*mmaq, "s--", color="C1", alpha=0.7, label="mma, 4 copies in flight")
        if dirn in ceil:
            ax.axhline(ceil[dirn], color="gray", ls=":", label=f"box ceiling at the start (best) {ceil[dirn]:.0f} GB/s")
        lc = column(12)  # local_ceil_gbps: the ceiling again beside each size's copies
        if lc[0]:
            ax.plot(*lc, "x:", color="gray", label="box ceiling beside each size")
        sc = column(13)  # same_ceil_gbps: every GPU copying size/ngpu at once
        if sc[0]:
            ax.plot(*sc, "+--", color="black", alpha=0.6, label="box ceiling, same bytes (each GPU size/ngpu)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("copy size (bytes)")
        ax.set_ylabel("GB/s")
        ax.set_title(f"{dirn} into gpu0, 4 x {card}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        out = os.path.join(d, f"bandwidth_{dirn.lower()}.png")
        fig.savefig(out, dpi=110)
        print("wrote", out)


def shares(d):
    path = os.path.join(d, "scenarios.csv")
    if not os.path.exists(path):
        return
    series = defaultdict(lambda: defaultdict(list))  # scen -> path -> [(t, bytes)]
    for r in csv.reader(open(path)):
        if r and r[0] == "share" and r[5] == "h2d":
            scen, t, tg, via = r[1], float(r[2]), int(r[3]), int(r[4])
            series[scen][(tg, via)].append((t, int(r[6])))
    for scen, paths in series.items():
        fig, ax = plt.subplots(figsize=(7, 4.2))
        for (tg, via), pts in sorted(paths.items()):
            rates = [(t1, (b1 - b0) / (t1 - t0) / 1e9) for (t0, b0), (t1, b1) in zip(pts, pts[1:]) if t1 > t0]
            if not any(v > 0.5 for _, v in rates):
                continue
            label = f"gpu{tg} direct" if tg == via else f"gpu{tg} via gpu{via}"
            ax.plot([t for t, _ in rates], [v for _, v in rates], label=label)
        ax.set_xlabel("seconds")
        ax.set_ylabel("GB/s (100 ms samples)")
        title = {"C": "C: 4 native loaders + 1 multipath client (gpu0)",
                 "D": "D: one multipath client per GPU"}.get(scen, scen)
        ax.set_title("per-path throughput through mmad, " + title, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        out = os.path.join(d, f"paths_over_time_{scen}.png")
        fig.savefig(out, dpi=110)
        print("wrote", out)


if __name__ == "__main__":
    d = sys.argv[1] if len(sys.argv) > 1 else "."
    bandwidth(d)
    shares(d)
