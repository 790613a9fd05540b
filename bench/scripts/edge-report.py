#!/usr/bin/env python3
"""Helpers of bench/scripts/edge.sh (stdlib only).

  edge-report.py clock                      realtime - monotonic offset (ns)
  edge-report.py snap PID SPOOL_DIR         /proc counters of PID as JSON
  edge-report.py report ARGS...             one run's summary block

Timestamps joined per reading (epoch, seq):
  sample  the sampler thread returning from a syscall that slept at least
          half a sample interval (its wait for the tick that takes the
          reading), from `perf record -k mono -e raw_syscalls:sys_enter,
          raw_syscalls:sys_exit -t SAMPLER_TID`, converted to the wall clock
          with the offset measured by `clock` (ns resolution);
  wire    the edge's WebSocket frame with that seq on loopback, towards the
          hub's port (tcpdump, ns timestamps; the frame is unmasked here):
          the moment the hub's kernel has it;
  dash    arrival at a dashboard subscriber (`ems-bench watch`, us);
  ts_ms   the reading's own sample time (ms, from the edge);
  rx_ms / received_at   the hub's receive time (ms, dashboard frame / SQLite).
"""
import json
import math
import os
import re
import sqlite3
import struct
import sys
import time


def clock_offset():
    """realtime - monotonic in ns, from the tightest of 20 read pairs."""
    best = None
    for _ in range(20):
        m0 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        r = time.clock_gettime_ns(time.CLOCK_REALTIME)
        m1 = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        if best is None or m1 - m0 < best[0]:
            best = (m1 - m0, r - (m0 + m1) // 2)
    return best[1]


def read_kv(path):
    out = {}
    try:
        with open(path) as f:
            for line in f:
                if ':' in line:
                    k, v = line.split(':', 1)
                    out[k.strip()] = v.strip()
    except OSError:
        pass
    return out


def snap(pid, spool):
    tck = os.sysconf("SC_CLK_TCK")
    threads = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            st = read_kv(f"/proc/{pid}/task/{tid}/status")
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                comm = f.read().strip()
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                s = f.read()
        except OSError:
            continue
        fields = s[s.rindex(')') + 2:].split()
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                sched_ns = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            sched_ns = 0
        threads[tid] = {
            "sched_ns": sched_ns,
            "comm": comm,
            "vol": int(st.get("voluntary_ctxt_switches", 0)),
            "nonvol": int(st.get("nonvoluntary_ctxt_switches", 0)),
            "cpu_s": (int(fields[11]) + int(fields[12])) / tck,
        }
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(')') + 2:].split()
    io = {}
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            k, v = line.split(':')
            io[k.strip()] = int(v)
    status = read_kv(f"/proc/{pid}/status")
    segs = sorted(n for n in os.listdir(spool) if n.endswith(".seg")) if spool else []
    return {
        "mono_ns": time.clock_gettime_ns(time.CLOCK_MONOTONIC),
        "real_ns": time.clock_gettime_ns(time.CLOCK_REALTIME),
        "cpu_s": (int(fields[11]) + int(fields[12])) / tck,
        "io": io,
        "rss_kb": int(status.get("VmRSS", "0 kB").split()[0]),
        "hwm_kb": int(status.get("VmHWM", "0 kB").split()[0]),
        "threads": threads,
        "segments": segs,
        "loadavg": open("/proc/loadavg").read().split()[:3],
    }


# ---------------------------------------------------------------- parsing

def pct(values, p):
    """Nearest-rank percentile (p in 0..100) of a sorted list."""
    if not values:
        return float("nan")
    k = max(1, math.ceil(p / 100.0 * len(values)))
    return values[min(k, len(values)) - 1]


def dist(name, values, unit, note=""):
    v = sorted(values)
    if not v:
        return f"{name} n=0" + (f"  # {note}" if note else "")
    mean = sum(v) / len(v)
    f = (lambda x: f"{x:.0f}") if unit == "us" else (lambda x: f"{x:.3f}" if unit == "ms_f" else f"{x:.0f}")
    line = (f"{name} n={len(v)} p50={f(pct(v, 50))} p99={f(pct(v, 99))} "
            f"p99.9={f(pct(v, 99.9))} max={f(v[-1])} mean={mean:.1f} min={f(v[0])}")
    return line + (f"  # {note}" if note else "")


def find_int(text, key):
    m = re.search(r'"%s":(-?\d+)' % key, text)
    return int(m.group(1)) if m else None


def perf_ticks(path, offset_ns, min_sleep_ns):
    """Wall-clock ns of every return from a syscall of the traced thread that
    slept at least min_sleep_ns: the sampler waking for a tick, whatever it
    waits in (futex, clock_nanosleep, poll, timerfd...)."""
    out = []
    if not path or not os.path.exists(path):
        return out
    pat = re.compile(r"\s(\d+)\s+\[\d+\]\s+(\d+\.\d+):\s+raw_syscalls:sys_(enter|exit): NR (\d+)")
    entered = {}
    with open(path) as f:
        for line in f:
            m = pat.search(line)
            if not m:
                continue
            sec, frac = m.group(2).split('.')
            mono = int(sec) * 10**9 + int(frac.ljust(9, '0')[:9])
            key = (m.group(1), m.group(4))
            if m.group(3) == "enter":
                entered[key] = mono
            else:
                t0 = entered.pop(key, None)
                if t0 is not None and mono - t0 >= min_sleep_ns:
                    out.append(mono + offset_ns)
    out.sort()
    return out


def pcap_frames(path, port):
    """(epoch, seq) -> wall-clock ns of the packet completing the edge's
    reading frame, from a tcpdump file (nanosecond pcap, Ethernet/IPv4)."""
    out = {}
    if not path or not os.path.exists(path):
        return out
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 24:
        return out
    magic = struct.unpack("<I", data[:4])[0]
    if magic == 0xA1B23C4D:
        endian, nano = "<", True
    elif magic == 0xA1B2C3D4:
        endian, nano = "<", False
    else:
        return out
    linktype = struct.unpack(endian + "I", data[20:24])[0]
    pos = 24
    streams = {}
    while pos + 16 <= len(data):
        sec, sub, incl, _orig = struct.unpack(endian + "IIII", data[pos:pos + 16])
        pkt = data[pos + 16:pos + 16 + incl]
        pos += 16 + incl
        t_ns = sec * 10**9 + (sub if nano else sub * 1000)
        if linktype == 1:
            eth = 14
        elif linktype == 113:
            eth = 16
        else:
            return out
        if len(pkt) < eth + 20:
            continue
        ip = pkt[eth:]
        ihl = (ip[0] & 0x0F) * 4
        total = struct.unpack(">H", ip[2:4])[0]
        tcp = ip[ihl:total]
        if len(tcp) < 20:
            continue
        sport, dport = struct.unpack(">HH", tcp[:4])
        if dport != port:
            continue
        doff = (tcp[12] >> 4) * 4
        payload = tcp[doff:]
        if not payload:
            continue
        buf = streams.setdefault(sport, bytearray())
        buf += payload
        # Parse complete client frames (masked) off the front of the stream.
        while True:
            if len(buf) < 2:
                break
            b0, b1 = buf[0], buf[1]
            n = b1 & 0x7F
            i = 2
            if n == 126:
                if len(buf) < 4:
                    break
                n = struct.unpack(">H", buf[2:4])[0]
                i = 4
            elif n == 127:
                if len(buf) < 10:
                    break
                n = struct.unpack(">Q", buf[2:10])[0]
                i = 10
            masked = b1 & 0x80
            key = b""
            if masked:
                if len(buf) < i + 4:
                    break
                key = bytes(buf[i:i + 4])
                i += 4
            if len(buf) < i + n:
                break
            body = bytes(buf[i:i + n])
            del buf[:i + n]
            if masked:
                body = bytes(c ^ key[j % 4] for j, c in enumerate(body))
            if (b0 & 0x0F) == 1 and body.startswith(b'{"type":"reading"'):
                text = body.decode("utf-8", "replace")
                k = (find_int(text, "epoch"), find_int(text, "seq"))
                out.setdefault(k, t_ns)  # first copy (a resend after reconnect is later)
    return out


def dash_rows(path):
    out = {}
    if not path or not os.path.exists(path):
        return out
    with open(path) as f:
        next(f, None)
        for line in f:
            p = line.strip().split(',')
            if len(p) != 5 or '' in p:
                continue
            epoch, seq, ts, rx, at = (int(x) for x in p)
            out.setdefault((epoch, seq), (ts, rx, at))
    return out


def db_rows(path, device):
    out = {}
    if not path or not os.path.exists(path):
        return out
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        for epoch, seq, ts, rx in con.execute(
                "SELECT epoch, seq, ts, received_at FROM readings WHERE device_id = ?", (device,)):
            out[(epoch, seq)] = (ts, rx)
    finally:
        con.close()
    return out


def match_sample(ticks, ts_ms, lo_idx):
    """The tick that took a reading stamped ts_ms: the last timed wake-up
    at or before ts_ms + 1 ms and after ts_ms - 2 ms (the stamp is the
    sample instant truncated to ms, give or take the read itself)."""
    import bisect
    hi = bisect.bisect_right(ticks, (ts_ms + 1) * 1_000_000)
    if hi == 0:
        return None
    t = ticks[hi - 1]
    if t < (ts_ms - 2) * 1_000_000:
        return None
    return t


# ---------------------------------------------------------------- report

def report(a):
    s0 = json.load(open(a["snap0"]))
    s1 = json.load(open(a["snap1"]))
    secs = (s1["mono_ns"] - s0["mono_ns"]) / 1e9
    name = a["name"]
    lines = [f"== run={name} interval_ms={a['interval_ms']} window_s={secs:.1f} "
             f"window_utc={time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(s0['real_ns'] / 1e9))}"
             f"..{time.strftime('%H:%M:%SZ', time.gmtime(s1['real_ns'] / 1e9))}",
             f"loadavg_start={'/'.join(s0['loadavg'])} loadavg_end={'/'.join(s1['loadavg'])}"
             + (f" loadavg_during={a['loads']}" if a.get("loads") else "")]
    if a.get("what"):
        lines.append(f"what={a['what']}")
    w0_ms, w1_ms = s0["real_ns"] // 10**6, s1["real_ns"] // 10**6

    if a.get("latency") == "1":
        offs = [int(x) for x in open(a["offsets"]).read().split()]
        drift_us = (max(offs) - min(offs)) / 1000 if offs else float("nan")
        off = offs[0] if offs else 0
        ticks = perf_ticks(a.get("perf"), off, int(a["interval_ms"]) * 10**6 // 2)
        wire = pcap_frames(a.get("pcap"), int(a["port"]))
        dash = dash_rows(a.get("dash"))
        db = db_rows(a.get("db"), a["device"])
        keys = sorted(k for k, (ts, _rx) in db.items() if w0_ms <= ts <= w1_ms)
        expect = int(round(secs * 1000 / int(a["interval_ms"])))
        lines.append(f"readings_in_window stored={len(keys)} expected~{expect} "
                     f"on_dashboard={sum(1 for k in keys if k in dash)} in_pcap={sum(1 for k in keys if k in wire)} "
                     f"perf_ticks={sum(1 for t in ticks if w0_ms * 10**6 <= t <= w1_ms * 10**6)} "
                     f"clock_offset_drift_us={drift_us:.0f}")
        l_db, l_dts, l_sw, l_sd, l_hub, l_rx, l_sts = [], [], [], [], [], [], []
        unmatched = 0
        rows = []
        for k in keys:
            ts, rx = db[k]
            l_db.append(rx - ts)
            d = dash.get(k)
            if d:
                l_dts.append(d[2] - ts * 1000)
                l_rx.append(d[1] - ts)
            s = match_sample(ticks, ts, 0) if ticks else None
            if s is None:
                unmatched += 1
            else:
                l_sts.append(s / 1000 - ts * 1000)
            wt = wire.get(k)
            if s is not None and wt is not None:
                l_sw.append((wt - s) / 1000)
            if s is not None and d:
                l_sd.append(d[2] - s / 1000)
            if wt is not None and d:
                l_hub.append(d[2] - wt / 1000)
            rows.append((k[1], ts, s // 1000 if s else "", wt // 1000 if wt else "",
                         d[2] if d else "", d[1] if d else "", rx))
        lines.append(dist("sample_to_hub_wire_us", l_sw, "us",
                          "sample instant (perf, ns) -> the edge's frame on loopback to the hub (pcap, ns)"))
        lines.append(dist("sample_to_dashboard_us", l_sd, "us",
                          "sample instant (perf) -> dashboard subscriber arrival (us)"))
        lines.append(dist("hub_wire_to_dashboard_us", l_hub, "us",
                          "the hub's share: frame on loopback -> dashboard arrival"))
        lines.append(dist("db_received_at_minus_ts_ms", l_db, "ms",
                          "stored received_at - ts: the latency the database shows; both ms-truncated, +-1 ms"))
        lines.append(dist("dashboard_rx_ms_minus_ts_ms", l_rx, "ms", "hub receive time in the dashboard frame, ms"))
        lines.append(dist("dashboard_arrival_minus_ts_us", l_dts, "us",
                          "no perf needed; ts_ms is truncated: reads up to 1 ms high"))
        lines.append(dist("sample_minus_ts_us", l_sts, "us",
                          f"check of the perf join: expect -1000..1000; {unmatched} readings without a tick"))
        if a.get("rows"):
            with open(a["rows"], "w") as f:
                f.write("seq,ts_ms,sample_us,wire_us,dash_us,rx_ms,received_at_ms\n")
                for r in rows:
                    f.write(",".join(str(x) for x in r) + "\n")

    # Wake-ups per thread (voluntary = blocked and woken; nonvoluntary = preempted).
    per = {}
    for tid, t1 in s1["threads"].items():
        t0 = s0["threads"].get(tid)
        if not t0:
            continue
        e = per.setdefault(t1["comm"], [0, 0, 0.0, 0])
        e[0] += t1["vol"] - t0["vol"]
        e[1] += t1["nonvol"] - t0["nonvol"]
        e[2] += t1["cpu_s"] - t0["cpu_s"]
        e[3] += 1
    tv = sum(e[0] for e in per.values())
    tn = sum(e[1] for e in per.values())
    lines.append(f"wakeups_per_s total={(tv + tn) / secs:.2f} voluntary={tv / secs:.2f} nonvoluntary={tn / secs:.2f} "
                 f"threads={len(s1['threads'])}  # ctxt switches summed over /proc/PID/task/*/status")
    for comm, e in sorted(per.items(), key=lambda kv: -(kv[1][0] + kv[1][1])):
        lines.append(f"wakeups_thread name={comm} x{e[3]} voluntary_per_s={e[0] / secs:.2f} "
                     f"nonvoluntary_per_s={e[1] / secs:.2f} cpu_s={e[2]:.3f}")

    io0, io1 = s0["io"], s1["io"]
    h = 3600.0 / secs
    d = {k: io1[k] - io0[k] for k in io1}
    lines.append(f"io write_bytes={d['write_bytes']} write_bytes_per_hour={d['write_bytes'] * h:.0f} "
                 f"wchar={d['wchar']} wchar_per_hour={d['wchar'] * h:.0f} syscw={d['syscw']} "
                 f"syscw_per_s={d['syscw'] / secs:.2f} read_bytes={d['read_bytes']} "
                 f"cancelled_write_bytes={d['cancelled_write_bytes']}  # /proc/PID/io over the window, x{h:.2f} for an hour")
    if a.get("perfstat") and os.path.exists(a["perfstat"]):
        counts = {}
        threads = {}
        for line in open(a["perfstat"]):
            p = line.strip().split(',')
            if len(p) < 4 or line.startswith('#'):
                continue
            try:
                n = int(p[1])
            except ValueError:
                continue
            ev = p[3].split(':')[-1].replace("sys_enter_", "")
            counts[ev] = counts.get(ev, 0) + n
            thr = re.sub(r"-\d+$", "", p[0])
            if n:
                threads.setdefault(ev, {}).setdefault(thr, 0)
                threads[ev][thr] += n
        syncs = counts.get("fdatasync", 0) + counts.get("fsync", 0)
        def by_thread(ev):
            return ";".join(f"{t}:{n}" for t, n in sorted(threads.get(ev, {}).items())) or "-"
        lines.append(f"syncs fdatasync={counts.get('fdatasync', 0)} fsync={counts.get('fsync', 0)} "
                     f"per_s={syncs / secs:.3f} per_hour={syncs * h:.0f} "
                     f"fdatasync_by_thread={by_thread('fdatasync')} fsync_by_thread={by_thread('fsync')}"
                     f"  # perf stat on syscalls:sys_enter_* tracepoints over the window")
        lines.append("syscalls " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()) if k != "sys_enter")
                     + f" all={counts.get('sys_enter', 0)} all_per_s={counts.get('sys_enter', 0) / secs:.1f}")
        if "sys_enter" in threads:
            lines.append("syscalls_per_s_by_thread " + " ".join(
                f"{t}={n / secs:.1f}" for t, n in sorted(threads["sys_enter"].items(), key=lambda kv: -kv[1])))
    seg0, seg1 = set(s0["segments"]), set(s1["segments"])
    lines.append(f"segments start={len(seg0)} end={len(seg1)} created={len(seg1 - seg0)} deleted={len(seg0 - seg1)}"
                 f"  # *.seg names at the window's ends (a segment created and deleted inside it is not seen)")
    cpu = s1["cpu_s"] - s0["cpu_s"]
    sched = sum(t1.get("sched_ns", 0) - s0["threads"][tid].get("sched_ns", 0)
                for tid, t1 in s1["threads"].items() if tid in s0["threads"]) / 1e9
    lines.append(f"footprint cpu_s={cpu:.3f} cpu_s_per_hour={cpu * h:.1f} cpu_pct={cpu / secs * 100:.3f} "
                 f"sched_cpu_s={sched:.4f} sched_cpu_s_per_hour={sched * h:.2f} "
                 f"rss_kb={s1['rss_kb']} hwm_kb={s1['hwm_kb']} threads={len(s1['threads'])}"
                 f"  # cpu_s = utime+stime (/proc/PID/stat, 10 ms ticks); sched_cpu_s = /proc/PID/task/*/schedstat (ns)")
    if a.get("extra"):
        for x in a["extra"].split("|"):
            if x:
                lines.append(x)
    print("\n".join(lines))


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "clock":
        print(clock_offset())
    elif cmd == "snap":
        json.dump(snap(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else ""), sys.stdout)
    elif cmd == "report":
        args = {}
        for kv in sys.argv[2:]:
            k, _, v = kv.partition("=")
            args[k] = v
        report(args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
