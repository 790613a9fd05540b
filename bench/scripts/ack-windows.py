#!/usr/bin/env python3
"""Compares ack latencies of readings sent while the all-devices listing ran
with those sent while it did not, in one run.

Usage: ack-windows.py ACK_LOG WINDOWS

ACK_LOG: `ems-bench run --ack-log` output, one `SEND_UNIX_S LATENCY_US` per
ack. WINDOWS: one `START_UNIX_S END_UNIX_S` line per window in which the
listing ran. A reading counts as "with the listing" when it was sent inside
a window, and as "without" when it was sent in a quiet gap: between two
windows, or as long as the others before the first and after the last one,
leaving out the first second after a window (a listing may still be
finishing) and the last 0.3 s before the next (its ack may arrive during
the next listing). Each window is compared with the gaps on both sides of
it, so that a drift of the ack latency over the run (the tables grow)
favours neither side. Prints both distributions and the p99 of each window
against that of its two gaps together.
"""
import sys


def quantile(xs, q):
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def line(name, xs):
    if not xs:
        return f"{name}: no acks"
    xs = sorted(xs)
    ms = lambda v: v / 1000
    return (f"{name}: n={len(xs)} p50={ms(quantile(xs, 0.5)):.1f}ms "
            f"p90={ms(quantile(xs, 0.9)):.1f}ms p99={ms(quantile(xs, 0.99)):.1f}ms "
            f"p99.9={ms(quantile(xs, 0.999)):.1f}ms max={ms(xs[-1]):.1f}ms "
            f"mean={ms(sum(xs) / len(xs)):.2f}ms")


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    wins = [tuple(map(float, l.split())) for l in open(sys.argv[2]) if l.strip()]
    if not wins:
        sys.exit("no listing windows")
    wins.sort()
    length = sum(e - s for s, e in wins) / len(wins)
    # The quiet gaps: before each window, and after the last one.
    bounds = [wins[0][0] - length - 1.0] + [e for _, e in wins]
    starts = [s for s, _ in wins] + [wins[-1][1] + length + 1.0]
    gaps = [(b + 1.0, n - 0.3) for b, n in zip(bounds, starts)]
    on = [[] for _ in wins]
    off = [[] for _ in gaps]
    for l in open(sys.argv[1]):
        t, us = l.split()
        t = float(t)
        us = int(us)
        for i, (s, e) in enumerate(wins):
            if s <= t < e:
                on[i].append(us)
                break
        else:
            for i, (s, e) in enumerate(gaps):
                if s <= t < e:
                    off[i].append(us)
                    break
    print(line("acks, listing running   ", [x for w in on for x in w]))
    print(line("acks, listing not running", [x for w in off for x in w]))
    worse = 0
    diffs = []
    for i in range(len(wins)):
        a = sorted(off[i] + off[i + 1])
        b = sorted(on[i])
        if not a or not b:
            continue
        pa, pb = quantile(a, 0.99) / 1000, quantile(b, 0.99) / 1000
        ma, mb = sum(a) / len(a) / 1000, sum(b) / len(b) / 1000
        diffs.append(mb - ma)
        worse += pb > pa
        print(f"  window {i + 1}: gaps on both sides p99 {pa:.1f} ms, mean {ma:.2f} ms; "
              f"during the listing p99 {pb:.1f} ms, mean {mb:.2f} ms")
    print(f"  windows whose p99 exceeds that of their gaps: {worse} of {len(wins)}")
    if len(diffs) > 1:
        m = sum(diffs) / len(diffs)
        sd = (sum((d - m) ** 2 for d in diffs) / (len(diffs) - 1)) ** 0.5
        print(f"  mean ack latency, window minus its gaps: {m:+.2f} ms "
              f"(standard error {sd / len(diffs) ** 0.5:.2f} ms over {len(diffs)} windows)")

main()
