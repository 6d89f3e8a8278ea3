"""CPU that a local Ray's own processes use while nothing runs: Ray's defaults vs the lean
settings kdray starts its local Ray with (kdray/orchestration/ray_train.py, LEAN_LOCAL_RAY and
no dashboard).

Issue 16 item 9: on a 2-core machine whatever Ray's daemons (GCS, raylet, dashboard and its
module processes, agents, log monitor, prestarted idle workers) use is taken from training, and
on a slower CPU the same periodic work takes a larger share. Each variant starts a fresh local
Ray in a child process, waits for it to settle, then sums the user + system CPU seconds of that
process's descendants over ``--seconds`` (from /proc, Linux only).

    python bench/ray_daemons.py                 # two variants x 60 s, ~2.5 min

Prints a Markdown table, then one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

VARIANTS = {
    "Ray defaults (dashboard on)": {"dashboard": True, "env": {}},
    "kdray's local Ray (lean)": {"dashboard": False, "env": "LEAN"},
}


def _descendants_cpu(root: int) -> tuple[int, float]:
    """(process count, CPU seconds) of ``root``'s descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            fields = open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        procs[int(d)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    kids, frontier = set(), {root}
    while frontier:
        frontier = {p for p, (parent, _) in procs.items() if parent in frontier and p not in kids}
        kids |= frontier
    return len(kids), sum(procs[p][1] for p in kids)


def child(dashboard: bool, seconds: float, settle: float) -> None:
    """Runs in the child: start Ray, settle, measure, print one JSON line."""
    import ray

    from kdray.orchestration.ray_train import loopback_only
    loopback_only()
    ray.init(address="local", num_cpus=2, include_dashboard=dashboard, logging_level="ERROR")
    time.sleep(settle)
    n, before = _descendants_cpu(os.getpid())
    time.sleep(seconds)
    _, after = _descendants_cpu(os.getpid())
    print(json.dumps({"processes": n, "core_percent": 100 * (after - before) / seconds}))
    ray.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=15.0)
    ap.add_argument("--child", choices=("on", "off"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child == "on", args.seconds, args.settle)
        return
    from kdray.orchestration.ray_train import LEAN_LOCAL_RAY
    rows = {}
    for name, v in VARIANTS.items():
        env = {**os.environ, **(LEAN_LOCAL_RAY if v["env"] == "LEAN" else v["env"])}
        out = subprocess.run([sys.executable, __file__, "--child", "on" if v["dashboard"] else "off",
                              "--seconds", str(args.seconds), "--settle", str(args.settle)],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
    base = rows["Ray defaults (dashboard on)"]["core_percent"]
    print(f"\nIdle CPU of Ray's own processes, {args.seconds:.0f} s after {args.settle:.0f} s "
          f"settling, % of one core\n")
    print("| variant | processes | % of one core | ratio to defaults |\n|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['processes']} | {r['core_percent']:.1f} | "
              f"{r['core_percent'] / base:.2f} |")
    print(json.dumps({"bench": "ray_daemons", "seconds": args.seconds, "variants": rows}))


if __name__ == "__main__":
    main()
