#!/usr/bin/env python3
"""Copies of an mmad chunk trace (mmad --trace) in phases: runs of copies of
one direction and size, one after another (a new phase where the size or
direction changes, copies overlap, or more than 1 ms passes between one's end
and the next one's send). mma-bench times each size in such phases (mma, then
auto, then on a stream). Per phase of at least 5 copies: the medians, over
all but its first copy, of the time in mmad (queued to done), the direct
path's share, the spread of the paths' ends (last minus first) and the direct
path's end; then the first dozen times.

    bench/trace_phases.py TRACE.csv[.gz] [MAX_MIB]
"""
import statistics as st
import sys

from trace_csv import read_jobs


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path = sys.argv[1]
    max_bytes = (int(sys.argv[2]) if len(sys.argv) > 2 else 1 << 20) << 20
    jobs = {}
    for k, rows in read_jobs(path).items():
        r0 = rows[0]
        j = jobs[k] = dict(bytes=int(r0["job_bytes"]), dir=r0["dir"], target=r0["target"], q=int(r0["t_queued"]),
                           sent=int(r0["t_sent"]), done=0, direct=0, ends={})
        for row in rows:
            done, via = int(row["t_done"]), row["via"]
            j["done"] = max(j["done"], done)
            j["ends"][via] = max(j["ends"].get(via, 0), done)
            if via == row["target"]:
                j["direct"] += int(row["len"])
    phases, cur = [], []
    for k in sorted(jobs):
        j = jobs[k]
        if cur:
            p = jobs[cur[-1]]
            if (j["dir"], j["bytes"]) != (p["dir"], p["bytes"]) or j["sent"] < p["done"] or j["sent"] - p["done"] > 1000000:
                phases.append(cur)
                cur = []
        cur.append(k)
    if cur:
        phases.append(cur)
    print("dir size_MiB jobs copies median_us direct_share end_spread_us direct_end_us | first times (us)")
    for p in phases:
        j0 = jobs[p[0]]
        if len(p) < 5 or j0["bytes"] > max_bytes:
            continue
        rest = [jobs[k] for k in p[1:]]
        took = [(j["done"] - j["q"]) / 1e3 for j in rest]
        share = [j["direct"] / j["bytes"] for j in rest]
        spread = [(max(j["ends"].values()) - min(j["ends"].values())) / 1e3 for j in rest]
        dend = [(j["ends"].get(j["target"], j["q"]) - j["q"]) / 1e3 for j in rest]
        first = " ".join("%.0f" % ((jobs[k]["done"] - jobs[k]["q"]) / 1e3) for k in p[:12])
        print("%s %g %d-%d %d %.1f %.3f %.1f %.1f | %s" % (j0["dir"], j0["bytes"] / 2**20, p[0], p[-1], len(p),
                                                         st.median(took), st.median(share), st.median(spread),
                                                         st.median(dend), first))


if __name__ == "__main__":
    main()
