#!/usr/bin/env python3
"""Is a slow copy mmad's doing or the box's? Reads an mmad --trace CSV and,
for the copies of one direction and size (the most frequent one unless given),
all but the first SKIP, prints:

- the copies' time in mmad (queued to the last chunk seen done): p10, p50,
  p90, and how alike neighbours are (autocorrelation at lags 1-100 copies):
  near 0, each copy's time is its own; near 1, the box drifts slowly and a
  run of copies is fast or slow together;
- the medians of windows of 50 copies, in order: the drift itself;
- the copies by fifths of their time, with the direct path's copy-engine rate
  while it ran on the GPU (needs mmad --trace-gpu=1): if the direct path's own
  copy engine runs slower in slow copies, the box's host side is slower then,
  since nothing of mmad's stands in that engine's way;
- how often the path that ended last ended more than 10 us after the one
  before it (a late path: a relay kernel relaunched mid-copy, or a
  completion seen late), and by how much.

    bench/trace_drift.py TRACE.csv[.gz] [--dir h2d] [--mib 64] [--skip 20]
"""
import argparse
import statistics as st
from collections import Counter, defaultdict

from trace_csv import read_jobs


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--dir", choices=("h2d", "d2h"))
    ap.add_argument("--mib", type=float)
    ap.add_argument("--skip", type=int, default=20)
    a = ap.parse_args()
    jobs = read_jobs(a.trace)
    kinds = Counter((rs[0]["dir"], int(rs[0]["job_bytes"])) for rs in jobs.values())
    want = [k for k in kinds if (not a.dir or k[0] == a.dir) and (not a.mib or k[1] == int(a.mib * 2**20))]
    if not want:
        raise SystemExit("no copies of that direction and size in the trace")
    d, size = max(want, key=lambda k: kinds[k])
    ks = [k for k in sorted(jobs) if (jobs[k][0]["dir"], int(jobs[k][0]["job_bytes"])) == (d, size)][a.skip:]
    if len(ks) < 5:
        raise SystemExit("fewer than 5 such copies after --skip")
    times, direct_rate, late = [], [], []
    for k in ks:
        rs = jobs[k]
        q = int(rs[0]["t_queued"])
        ends = defaultdict(int)
        for r in rs:
            ends[int(r["via"])] = max(ends[int(r["via"])], int(r["t_done"]) - q)
        times.append(max(ends.values()) / 1e3)
        e = sorted(ends.values())
        late.append((e[-1] - e[-2]) / 1e3 if len(e) > 1 else 0.0)
        dr = [r for r in rs if r["via"] == r["target"] and int(r.get("g_first_start") or 0)]
        busy = sum(int(r["g_first_end"]) - int(r["g_first_start"]) for r in dr)
        direct_rate.append(sum(int(r["len"]) for r in dr) / busy if dr and busy > 0 else None)
    n = len(times)
    dec = st.quantiles(times, n=10)
    print("%s %g MiB: %d copies (the first %d left out); in mmad p10 %.1f p50 %.1f p90 %.1f us"
          % (d, size / 2**20, n, a.skip, dec[0], st.median(times), dec[-1]))
    m = st.mean(times)
    var = sum((x - m) ** 2 for x in times)
    ac = ["lag %d %.2f" % (lag, sum((times[i] - m) * (times[i + lag] - m) for i in range(n - lag)) / var)
          for lag in (1, 2, 5, 20, 100) if lag < n and var > 0]
    print("autocorrelation: " + ", ".join(ac))
    w = 50
    if n >= w:
        print("medians of windows of %d copies (us): %s"
              % (w, " ".join("%.0f" % st.median(times[i:i + w]) for i in range(0, n - w + 1, w))))
    if any(x is not None for x in direct_rate):
        order = sorted(range(n), key=lambda i: times[i])
        print("copies by fifths of their time: the direct path's copy engine, GB/s while it ran (median)")
        for p in range(5):
            idx = order[p * n // 5:(p + 1) * n // 5]
            rates = [direct_rate[i] for i in idx if direct_rate[i] is not None]
            if idx and rates:
                print("  %6.0f-%-6.0f us  %5.1f" % (times[idx[0]], times[idx[-1]], st.median(rates)))
    else:
        print("(no GPU times in the trace: run mmad with --trace-gpu=1 for the direct path's rate)")
    lt = [x for x in late if x > 10]
    print("last path more than 10 us after the one before it: %.0f%% of copies (median %.1f us); "
          "mean gap last to next-to-last %.1f us"
          % (100.0 * len(lt) / n, st.median(lt) if lt else 0.0, st.mean(late)))


if __name__ == "__main__":
    main()
