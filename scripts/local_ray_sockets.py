"""List the listening sockets of every process a dgbatch-started local Ray runs; fail if one is not loopback.

    python scripts/local_ray_sockets.py [--json]

Starts Ray the way `dgbatch run` does without `ray.address` (`pool.start_local_ray`), runs a task and
an actor so workers exist, then reads `ss -H -ltnup` for this process and all its descendants (GCS,
raylet, workers, dashboard and runtime-env agents). Exit 0 if every socket is on 127.0.0.1, else 1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "[::1]")


def descendants(root: int) -> set[int]:
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                stat = open(f"/proc/{d}/stat").read()  # noqa: SIM115 - one short read
            except OSError:
                continue
            parent[int(d)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = {root}, [root]
    while frontier:
        p = frontier.pop()
        for child, ppid in parent.items():
            if ppid == p and child not in found:
                found.add(child)
                frontier.append(child)
    return found


def listening(pids: set[int]) -> list[dict]:
    out = subprocess.run(["ss", "-H", "-ltnup"], capture_output=True, text=True, check=True).stdout
    sockets = []
    for line in out.splitlines():
        owners = [int(p) for p in re.findall(r"pid=(\d+)", line)]
        if any(p in pids for p in owners):
            fields = line.split()
            name = re.findall(r'"([^"]+)"', line)
            sockets.append({"proto": fields[0], "local": fields[4], "process": name[0] if name else "?"})
    return sockets


def main() -> int:
    import ray

    from dgbatch.pool import start_local_ray

    start_local_ray(ray, 1)

    @ray.remote
    def task() -> int:
        return os.getpid()

    @ray.remote
    class Actor:
        def pid(self) -> int:
            return os.getpid()

    ray.get(task.remote())
    actor = Actor.remote()
    ray.get(actor.pid.remote())
    time.sleep(2)  # agents finish binding
    sockets = listening(descendants(os.getpid()))
    ray.shutdown()
    exposed = [s for s in sockets if not s["local"].startswith(LOOPBACK)]
    if "--json" in sys.argv:
        print(json.dumps({"sockets": sockets, "exposed": exposed}))
    else:
        for s in sockets:
            print(f"{s['proto']} {s['local']:<28} {s['process']}")
        print(f"{len(sockets)} listening sockets, {len(exposed)} not on loopback")
    return 1 if exposed or not sockets else 0


if __name__ == "__main__":
    sys.exit(main())
