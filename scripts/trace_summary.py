#!/usr/bin/env python3
"""Sums a Chrome trace from libtorch's profiler (`[train] profile_steps`, or
torch.profiler's export) per GPU stream: how long the GPU computed, how long
collectives (NCCL) ran, how much of that hid behind compute, how long the
GPU sat idle, and which kernels took the time. Per step, with --steps.

    python3 scripts/trace_summary.py runs/x/trace.json --steps 5
"""
import argparse
import collections
import json


def union(iv):
    """Total length of the union of [start, end) intervals, and the merged list."""
    merged = []
    for s, e in sorted(iv):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return sum(e - s for s, e in merged), merged


def intersect(a, b):
    """Length of the intersection of two merged interval lists."""
    i = j = 0
    total = 0.0
    while i < len(a) and j < len(b):
        s, e = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if e > s:
            total += e - s
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("trace")
    ap.add_argument("--steps", type=int, default=1, help="steps the trace holds (figures are per step)")
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    ev = json.load(open(a.trace))
    ev = ev["traceEvents"] if isinstance(ev, dict) else ev
    gpu = [e for e in ev if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    if not gpu:
        raise SystemExit(f"{a.trace}: no GPU events (was the profile taken on CUDA?)")
    n = a.steps
    t0 = min(e["ts"] for e in gpu)
    t1 = max(e["ts"] + e["dur"] for e in gpu)
    window = t1 - t0
    is_comm = lambda e: "nccl" in e["name"].lower()
    by_stream = collections.defaultdict(list)
    for e in gpu:
        by_stream[e.get("args", {}).get("stream", e.get("tid"))].append(e)
    print(f"trace {a.trace}: {len(gpu)} GPU events over {window / 1e3:.2f} ms ({window / 1e3 / n:.2f} ms per step, {n} steps)")
    print("per stream (ms per step): busy, events per step, of which collectives")
    for s, es in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        busy, _ = union([(e["ts"], e["ts"] + e["dur"]) for e in es])
        comm = sum(e["dur"] for e in es if is_comm(e))
        print(f"  stream {s}: busy {busy / 1e3 / n:8.2f}  events {len(es) / n:7.0f}  collectives {comm / 1e3 / n:7.2f}")
    comp_busy, comp = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if not is_comm(e)])
    comm_busy, comm = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu if is_comm(e)])
    all_busy, merged = union([(e["ts"], e["ts"] + e["dur"]) for e in gpu])
    hidden = intersect(comp, comm)
    print(f"compute busy {comp_busy / 1e3 / n:.2f} ms/step; collectives {comm_busy / 1e3 / n:.2f} ms/step, "
          f"{hidden / 1e3 / n:.2f} of it beside compute ({100 * hidden / max(comm_busy, 1e-9):.0f}%), "
          f"{(comm_busy - hidden) / 1e3 / n:.2f} exposed")
    print(f"GPU idle (no kernel on any stream): {(window - all_busy) / 1e3 / n:.2f} ms/step "
          f"({100 * (window - all_busy) / window:.1f}% of the window)")
    gaps = sorted(((b[0] - a_[1], a_[1] - t0) for a_, b in zip(merged, merged[1:])), reverse=True)[:5]
    print("longest idle gaps: " + ", ".join(f"{g / 1e3:.2f} ms at +{at / 1e3:.1f} ms" for g, at in gaps))
    tot = collections.Counter()
    cnt = collections.Counter()
    for e in gpu:
        k = e["name"][:90]
        tot[k] += e["dur"]
        cnt[k] += 1
    print(f"top {a.top} GPU events by time (ms per step, calls per step):")
    for k, v in tot.most_common(a.top):
        print(f"  {v / 1e3 / n:8.2f}  {cnt[k] / n:6.0f}  {k}")
    rt = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"]
    if rt:
        rtt = collections.Counter()
        for e in rt:
            rtt[e["name"]] += e["dur"]
        print("host CUDA runtime calls (ms per step): " +
              ", ".join(f"{k} {v / 1e3 / n:.2f}" for k, v in rtt.most_common(6)))
    ops = [e for e in ev if e.get("ph") == "X" and e.get("cat") == "cpu_op"]
    print(f"host operators: {len(ops) / n:.0f} per step")


if __name__ == "__main__":
    main()
