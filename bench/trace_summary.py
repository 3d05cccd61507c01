#!/usr/bin/python3
"""Read an mmad --trace CSV and show where a copy's time goes.

For every (direction, size) it takes the copies of that size and prints the
medians of: when the copy became runnable, when its first and last chunks were
issued, and per path (via GPU) when its first chunk was issued, when its last
chunk finished, its bytes and its chunks. All times are microseconds from the
moment mmad queued the copy. Where the client stamped its send time (t_sent,
libmma does), "sent" is how long the request took from the client's send
call to mmad's queue (the same host's CLOCK_MONOTONIC).

Where mmad's cuda backend timed the chunks' copies on the GPUs too (its
--trace does), it also prints per path when those ran there (gpu_side).

  bench/trace_summary.py trace.csv [--min-bytes N] [--skip N]
"""
import argparse
import statistics
import sys
from collections import defaultdict

from trace_csv import read_jobs


def med(xs):
    return statistics.median(xs) if xs else float("nan")


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--min-bytes", type=int, default=1 << 20)
    ap.add_argument("--skip", type=int, default=2, help="first copies of each size left out (warm-up)")
    a = ap.parse_args()
    jobs = read_jobs(a.csv)
    # Only copies that had mmad to themselves: a copy whose time overlaps
    # another's (mma-bench's 4-in-flight columns, other clients) is left out.
    span = {j: (int(rs[0]["t_queued"]), max(int(r["t_done"]) for r in rs)) for j, rs in jobs.items()}
    order = sorted(jobs, key=lambda j: span[j][0])
    alone = set(order)
    for k in range(1, len(order)):
        cur = order[k]
        for p in order[max(0, k - 16):k]:
            if span[cur][0] < span[p][1]:
                alone.discard(p)
                alone.discard(cur)
    groups = defaultdict(list)
    overlapped = 0
    for jid in sorted(jobs):
        rs = jobs[jid]
        b = int(rs[0]["job_bytes"])
        if b < a.min_bytes or any(int(r["status"]) != 0 for r in rs):
            continue
        if jid not in alone:
            overlapped += 1
            continue
        groups[(rs[0]["dir"], b)].append(rs)
    print("%d copies of at least %d bytes overlapped others and are left out" % (overlapped, a.min_bytes))
    if not groups:
        sys.exit("no finished copies of at least %d bytes in %s" % (a.min_bytes, a.csv))
    for (d, b), js in sorted(groups.items()):
        js = js[a.skip:] if len(js) > a.skip + 2 else js
        us = lambda r, k: (int(r[k]) - int(r["t_queued"])) / 1e3
        runnable, first, last_sub, end, sub_sum, sent = [], [], [], [], [], []
        per = defaultdict(lambda: defaultdict(list))
        for rs in js:
            runnable.append(us(rs[0], "t_runnable"))
            if int(rs[0].get("t_sent") or 0):
                sent.append(-us(rs[0], "t_sent"))
            first.append(min(us(r, "t_issue") for r in rs))
            last_sub.append(max(us(r, "t_submitted") for r in rs))
            end.append(max(us(r, "t_done") for r in rs))
            sub_sum.append(sum((int(r["t_submitted"]) - int(r["t_issue"])) / 1e3 for r in rs))
            byvia = defaultdict(list)
            for r in rs:
                byvia[int(r["via"])].append(r)
            for v, cs in byvia.items():
                per[v]["start"].append(min(us(r, "t_issue") for r in cs))
                per[v]["end"].append(max(us(r, "t_done") for r in cs))
                per[v]["bytes"].append(sum(int(r["len"]) for r in cs))
                per[v]["chunks"].append(len(cs))
                per[v]["sub"].append(med([(int(r["t_submitted"]) - int(r["t_issue"])) / 1e3 for r in cs]))
        mib = b / 2**20
        e = med(end)
        print("%s %g MiB: %d copies; medians in us from queued: runnable %.1f, first issue %.1f, "
              "last submitted %.1f, done %.1f (p10 %.1f, p90 %.1f; %.1f GB/s in mmad); submit time per copy %.1f%s"
              % (d, mib, len(js), med(runnable), med(first), med(last_sub), e, pct(end, 0.1), pct(end, 0.9),
                 b / e / 1e3, med(sub_sum),
                 "; sent %.1f before queued (p90 %.1f)" % (med(sent), pct(sent, 0.9)) if sent else ""))
        print("   via   start     end   MiB  chunks  submit-us  GB/s(start..end)")
        for v in sorted(per):
            p = per[v]
            s_, e_, by = med(p["start"]), med(p["end"]), med(p["bytes"])
            print("  %4d %7.1f %7.1f %5.1f %7.1f %10.1f %8.1f" % (v, s_, e_, by / 2**20, med(p["chunks"]),
                                                              med(p["sub"]), by / max(e_ - s_, 1e-9) / 1e3))
        gpu_side(js, d, us)


def gpu_side(js, d, us):
    """Where the trace has GPU times (mmad's cuda backend): per path, when its
    copies ran on the GPU. "pcie" is each chunk's PCIe copy (a relay's leg,
    H2D its first copy, D2H its second; a direct chunk's only copy): from
    the path's first one starting to its last one ending, the time they ran
    (their union), the rate while running, and the idle time between them.
    For staged relays "hop" is the NVLink copy: how long it waited after
    (H2D) or before (D2H) the leg, and how long it ran. Medians over copies."""
    rows = defaultdict(lambda: defaultdict(list))
    for rs in js:
        byvia = defaultdict(list)
        for r in rs:
            if int(r.get("g_first_start") or 0):
                byvia[int(r["via"])].append(r)
        for v, cs in byvia.items():
            relay = int(cs[0]["via"]) != int(cs[0]["target"])
            leg = lambda r: (("g_first_start", "g_first_end") if not relay or d == "h2d"
                             else ("g_second_start", "g_second_end"))
            iv = sorted((us(r, leg(r)[0]), us(r, leg(r)[1]), int(r["len"])) for r in cs)
            busy, cur_s, cur_e = 0.0, iv[0][0], iv[0][1]
            for a, b, _ in iv[1:]:
                if a > cur_e:
                    busy += cur_e - cur_s
                    cur_s, cur_e = a, b
                else:
                    cur_e = max(cur_e, b)
            busy += cur_e - cur_s
            span_s, span_e = iv[0][0], max(b for _, b, _ in iv)
            w = rows[v]
            w["start"].append(span_s)
            w["end"].append(span_e)
            w["busy"].append(busy)
            w["idle"].append(span_e - span_s - busy)
            w["gbps"].append(sum(n for _, _, n in iv) / max(busy, 1e-9) / 1e3)
            if relay and int(cs[0].get("g_second_start") or 0):
                if d == "h2d":
                    w["wait"] += [us(r, "g_second_start") - us(r, "g_first_end") for r in cs]
                    w["hop"] += [us(r, "g_second_end") - us(r, "g_second_start") for r in cs]
                else:
                    w["wait"] += [us(r, "g_second_start") - us(r, "g_first_end") for r in cs]
                    w["hop"] += [us(r, "g_first_end") - us(r, "g_first_start") for r in cs]
    if not rows:
        return
    print("   on the GPUs (us from queued): pcie start, end, ran, idle between, GB/s while running; hop wait, hop")
    for v in sorted(rows):
        w = rows[v]
        hop = ("%8.1f %8.1f" % (med(w["wait"]), med(w["hop"]))) if w["hop"] else "%8s %8s" % ("-", "-")
        print("  %4d %7.1f %7.1f %7.1f %6.1f %7.1f %s" % (v, med(w["start"]), med(w["end"]), med(w["busy"]),
                                                         med(w["idle"]), med(w["gbps"]), hop))


if __name__ == "__main__":
    main()
