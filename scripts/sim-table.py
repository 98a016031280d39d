#!/usr/bin/env python3
"""Runs `guildhall simulate` on every generated trace for several seeds and
prints the BENCHMARKS.md table: per trace and policy, the median (min-max)
over the seeds of the target-met share, worker-minutes, p95 wait, peak
workers, scale actions and MASE.

    cargo build --release -p guildhall
    python3 scripts/sim-table.py [--seeds 5] [--bin target/release/guildhall]
"""
import argparse
import json
import statistics
import subprocess
import time

TRACES = [
    ("diurnal", ["--generate", "diurnal", "--days", "7"]),
    ("spike", ["--generate", "spike"]),
    ("step", ["--generate", "step"]),
    ("noisy", ["--generate", "noisy"]),
    ("diurnal, 2 stages", ["--generate", "diurnal", "--days", "7", "--stages",
                           "build:median=10s;report:dist=exponential,mean=1s"]),
]


def spread(values, fmt):
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    if min(values) == max(values):
        return fmt(med)
    return f"{fmt(med)} ({fmt(min(values))}-{fmt(max(values))})"


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--bin", default="target/release/guildhall")
    a = p.parse_args()
    print("| trace | policy | target met | worker-min | p95 wait | peak | scale actions | MASE |")
    print("|---|---|---|---|---|---|---|---|")
    secs = []
    for name, args in TRACES:
        rows = {}
        for seed in range(1, a.seeds + 1):
            start = time.monotonic()
            out = subprocess.run([a.bin, "simulate", *args, "--seed", str(seed), "--json"],
                                 check=True, capture_output=True, text=True).stdout
            secs.append(time.monotonic() - start)
            for pol in json.loads(out)["policies"]:
                rows.setdefault(pol["policy"], []).append(pol)
        for policy, runs in rows.items():
            peak = [sum(s["peak_workers"] for s in r["stages"]) for r in runs]
            print("| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                name, policy,
                spread([r["target_met_share"] * 100 for r in runs], lambda v: f"{v:.1f}%"),
                spread([r["worker_minutes"] for r in runs], lambda v: f"{v:,.0f}"),
                spread([r["wait_ms"]["p95"] / 1000 for r in runs], lambda v: f"{v:.1f} s"),
                spread(peak, lambda v: f"{v:.0f}"),
                spread([r["scale_actions"] for r in runs], lambda v: f"{v:.0f}"),
                spread([r["mase"] for r in runs], lambda v: f"{v:.2f}"),
            ))
    print(f"\n{len(secs)} simulations, {statistics.median(secs):.2f} s each "
          f"(median; {min(secs):.2f}-{max(secs):.2f} s)")


if __name__ == "__main__":
    main()
