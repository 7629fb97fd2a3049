"""A multi-node Ray cluster on this machine for the node-loss tests (``ray.cluster_utils.Cluster``, as Ray's own
test suite makes one): a head with no CPU, which a job's driver attaches to (Ray prefers the head among several
raylets of one host), and worker nodes of fractional CPUs; helpers to find the node a worker process runs on."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# a removed node is declared dead after ~3 s instead of Ray's default 30 s: the tests wait on the retries
HEALTH_CHECK = {"health_check_failure_threshold": 3, "health_check_period_ms": 1000}


@contextmanager
def worker_cluster(workers: int = 2, cpus: float = 1.0) -> Iterator[tuple[object, list]]:
    """-> (cluster, worker nodes). Every process the cluster started is killed on exit (never ``ray stop``,
    which would stop every Ray on the machine)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, shutdown_at_exit=True,
                      head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": HEALTH_CHECK})
    try:
        nodes = [cluster.add_node(num_cpus=cpus) for _ in range(workers)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()  # the worker nodes still alive
        if cluster.head_node is not None:
            cluster.remove_node(cluster.head_node, allow_graceful=False)


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def node_of(pid: int, nodes) -> object | None:
    """The node among ``nodes`` whose raylet started worker process ``pid`` (the raylet is a worker's parent)."""
    try:
        ppid = _parent(pid)
    except (OSError, ValueError, IndexError):
        return None
    for n in nodes:
        raylet = n.all_processes.get("raylet") or []
        if any(p.process is not None and p.process.pid == ppid for p in raylet):
            return n
    return None


def workers_running(name: str, nodes) -> list[tuple[int, object]]:
    """(pid, node) of every Ray worker process of ``nodes`` whose title is ``ray::<name>`` (the task it runs)."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")[0].decode(errors="replace").strip()
        except OSError:
            continue
        if cmd.startswith(f"ray::{name}"):
            node = node_of(int(d.name), nodes)
            if node is not None:
                out.append((int(d.name), node))
    return out
