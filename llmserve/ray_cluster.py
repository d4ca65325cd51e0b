"""A local Ray cluster of several nodes on one machine, for the multi-node aliases' tests, benchmarks
and README (`python -m llmserve.ray_cluster start|stop`).

Each node is its own `ray start --block` in a process group of its own, with its own CPUs and a
custom resource naming it (``node_0``, ``node_1``, ...), the way Ray's own tests build clusters
(ray.cluster_utils.Cluster): killing one node's group is a node failing, and stopping the group
of each node leaves no Ray process behind. A real cluster (KubeRay, `ray start` on each host) is
the same thing with one node per host; the server only needs its address.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .config import PROJECT_ROOT
from .launcher import BIN, free_port

STATE = PROJECT_ROOT / ".cache" / "ray-cluster.json"  # what `stop` reads back
# a small object store: vLLM passes only the pipeline's activations through Ray
OBJECT_STORE_BYTES = 100 * 1024 * 1024


@dataclass
class LocalCluster:
    address: str  # host:port of the head's GCS, what RAY_ADDRESS / ray.address name
    temp_dir: str
    # one session per node, the head first: `ray start` leads it, and every process of the node
    # stays in it (Ray's workers take process groups of their own, not sessions)
    sessions: list[int] = field(default_factory=list)

    def kill_node(self, index: int, sig: int = signal.SIGKILL, timeout: float = 10) -> None:
        """Ends node ``index`` (1 = the first worker node) as a failing host would: all its processes.
        With SIGKILL, until none is left (a raylet may fork a worker while its session is being killed)."""
        deadline = time.monotonic() + timeout
        while pids := session_pids(self.sessions[index]):
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if sig != signal.SIGKILL or time.monotonic() > deadline:
                return
            time.sleep(0.1)

    def pids(self) -> list[int]:
        """Every live process of every node."""
        return [pid for sid in self.sessions for pid in session_pids(sid)]

    def stop(self, timeout: float = 30) -> None:
        """Ends every node, workers first (`ray start` stops its node's processes on SIGTERM), then
        kills what is left once ``timeout`` seconds have passed."""
        for sid in reversed(self.sessions):
            try:
                os.kill(sid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.2)
        for i in range(len(self.sessions)):
            self.kill_node(i)
        shutil.rmtree(self.temp_dir, ignore_errors=True)  # the nodes' sessions and logs, ~1 MB a start
        if STATE.exists() and json.loads(STATE.read_text()).get("address") == self.address:
            STATE.unlink()

    def save(self) -> None:
        STATE.parent.mkdir(exist_ok=True)
        STATE.write_text(json.dumps(asdict(self)))


def session_pids(sid: int) -> list[int]:
    """The live (not zombie) processes of session ``sid``, from /proc."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[3]) == sid:  # state, ppid, pgrp, session
            pids.append(int(entry))
    return pids


def start(nodes: int = 2, cpus_per_node: int = 1, temp_dir: str | None = None, timeout: float = 120,
          log_dir: Path | None = None) -> LocalCluster:
    """Starts a head and ``nodes - 1`` worker nodes on this machine and waits until all are alive."""
    port = free_port()
    temp_dir = temp_dir or f"/tmp/ray-llmserve-{port}"  # short: Ray's socket paths must fit 107 bytes
    log_dir = log_dir or PROJECT_ROOT / ".cache"
    log_dir.mkdir(exist_ok=True)
    cluster = LocalCluster(f"127.0.0.1:{port}", temp_dir)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--block", "--num-cpus", str(cpus_per_node), "--num-gpus", "0", "--disable-usage-stats",
              "--object-store-memory", str(OBJECT_STORE_BYTES), "--temp-dir", temp_dir]
    try:
        for i in range(nodes):
            where = (["--head", "--node-ip-address", "127.0.0.1", "--port", str(port), "--include-dashboard", "false",
                      "--ray-client-server-port", str(free_port())] if i == 0
                     else ["--address", cluster.address, "--node-ip-address", "127.0.0.1"])
            cmd = [str(BIN / "ray"), "start", *where, *common, "--resources", json.dumps({f"node_{i}": 1})]
            log = (log_dir / f"ray-node-{i}.log").open("wb")
            proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            cluster.sessions.append(proc.pid)
            if i == 0:
                _wait_nodes(cluster, 1, timeout, proc)
        _wait_nodes(cluster, nodes, timeout)
    except BaseException:
        cluster.stop()
        raise
    cluster.save()
    return cluster


def alive_nodes(address: str) -> list[dict]:
    """The cluster's alive nodes as Ray's GCS lists them (NodeID, Resources, ...)."""
    out = subprocess.run([str(BIN / "python"), "-c", _ALIVE_NODES, address], capture_output=True, text=True,
                         timeout=120)
    if out.returncode != 0:
        raise RuntimeError(f"listing the nodes of {address} failed: {out.stderr[-2000:]}")
    # Ray's own warnings (e.g. "raylet has lagging heartbeats") share the child's stdout, also after ours
    listed = [line[len(_NODES_MARK):] for line in out.stdout.splitlines() if line.startswith(_NODES_MARK)]
    if not listed:
        raise RuntimeError(f"listing the nodes of {address} printed no list: {out.stdout[-2000:]}")
    return json.loads(listed[-1])


def _wait_nodes(cluster: LocalCluster, count: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Waits until ``count`` nodes are alive, failing after ``timeout`` seconds or when ray start exits."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            if len(alive_nodes(cluster.address)) >= count:
                return
        except (RuntimeError, subprocess.TimeoutExpired, ValueError, IndexError) as exc:
            last = exc  # the GCS is not up yet
        time.sleep(1)
    raise RuntimeError(f"{count} Ray node(s) not alive after {timeout:.0f} s: {last}")


# asked in a child process: ray.init in this one would make it a driver of the cluster for good
_NODES_MARK = "llmserve-alive-nodes: "
_ALIVE_NODES = f"""
import json, sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
print({_NODES_MARK!r} + json.dumps([n for n in ray.nodes() if n["Alive"]], default=str), flush=True)
"""


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("start", help="start the nodes; prints the address (export it as RAY_ADDRESS)")
    up.add_argument("--nodes", type=int, default=2)
    up.add_argument("--cpus-per-node", type=int, default=1)
    sub.add_parser("stop", help="stop the cluster `start` recorded")
    args = parser.parse_args(argv)
    if args.cmd == "start":
        cluster = start(args.nodes, args.cpus_per_node)
        print(cluster.address)
    else:
        if not STATE.exists():
            sys.exit("no local Ray cluster recorded")
        LocalCluster(**json.loads(STATE.read_text())).stop()


if __name__ == "__main__":
    main()
