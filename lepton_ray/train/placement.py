"""Can every node a worker may be placed on reach the run's paths? Checked on the driver, before any worker starts.

A local path (no scheme, or ``file://``) names a file on the node that reads it. On a single-node
cluster that is the driver's own disk, so local data and checkpoints just work. Once Ray may place
a worker on another node, that worker reads *its* disk: the README's main job submitted with
``ray job submit --working-dir .`` to two nodes built ``data/digits/`` on the head and rank 1, on
the other node, died 33 s later with a FileNotFoundError traceback. Here it is one config error
instead, before anything starts, unless ``scaling.shared_filesystem`` says every node mounts the path.
"""

from __future__ import annotations

import os
from typing import Any, Optional

from lepton_ray.config import Config, ConfigError
from lepton_ray.storage import is_local

__all__ = ["check_paths_reachable", "worker_nodes", "node_local_paths"]


def worker_nodes(nodes: list[dict[str, Any]], cpus: float, use_gpu: bool) -> list[str]:
    """The ids of the alive nodes (``ray.nodes()`` entries) with room for one worker.

    >>> nodes = [{"NodeID": "a", "Alive": True, "Resources": {"CPU": 2.0}},
    ...          {"NodeID": "b", "Alive": True, "Resources": {"CPU": 1.0}},
    ...          {"NodeID": "c", "Alive": False, "Resources": {"CPU": 8.0}}]
    >>> worker_nodes(nodes, cpus=1, use_gpu=False), worker_nodes(nodes, cpus=2, use_gpu=False), worker_nodes(nodes, cpus=1, use_gpu=True)
    (['a', 'b'], ['a'], [])
    """
    def fits(r: dict[str, float]) -> bool:
        return r.get("CPU", 0) >= cpus and (not use_gpu or r.get("GPU", 0) >= 1)

    return [n["NodeID"] for n in nodes if n.get("Alive") and fits(n.get("Resources", {}))]


def node_local_paths(config: Config, checkpoint_uri: str) -> list[tuple[str, str]]:
    """``(config key, absolute path)`` of every node-local path the workers read or write.

    >>> from lepton_ray.config import load_config
    >>> cfg = load_config({"data": {"train": "/d/t.parquet", "eval": "s3://b/e"}, "run": {"dir": "/r"}})
    >>> node_local_paths(cfg, "/r/run/checkpoints")
    [('data.train', '/d/t.parquet'), ('run.dir', '/r/run/checkpoints')]
    """
    d = config.data
    candidates = [("data.train", d.train), ("data.eval", d.eval),
                  ("checkpoint.dir" if config.checkpoint.dir else "run.dir", checkpoint_uri)]
    return [(key, os.path.abspath(os.path.expanduser(uri.removeprefix("file://"))))
            for key, uri in candidates if uri and is_local(uri) and not uri.startswith("dataset:")]  # a Dataset passed in


def check_paths_reachable(config: Config, local: list[tuple[str, str]], nodes: Optional[list[dict[str, Any]]] = None,
                          here: Optional[str] = None) -> None:
    """Raise a :class:`ConfigError` when a worker may run on another node than this one and a path it
    reads or writes (``local``: :func:`node_local_paths`) is on this node's disk (and
    ``scaling.shared_filesystem`` is not set).

    ``local`` is resolved before Ray connects: under ``ray job submit`` Ray may replace the job's working
    directory (the driver's cwd) while ``ray.init`` installs the job's runtime env, and a relative path
    resolved after that fails in ``os.getcwd``.
    ``nodes`` and ``here`` default to ``ray.nodes()`` and this driver's node id (Ray must be connected).
    """
    s = config.scaling
    if s.shared_filesystem or not local:
        return
    if nodes is None or here is None:
        import ray

        nodes, here = ray.nodes(), ray.get_runtime_context().get_node_id()
    if not set(worker_nodes(nodes, s.cpus_per_worker, s.use_gpu)) - {here}:
        return  # every worker lands on this node: its disk is theirs
    (key, path), *others = local
    alive = sum(1 for n in nodes if n.get("Alive"))
    also = f" (so are {', '.join(k for k, _ in others)})" if others else ""
    raise ConfigError(
        f"{key}: '{path}' is on this node's disk{also}, but the Ray cluster has {alive} nodes and workers on the"
        " other nodes cannot read it; use an object-storage URI (s3://bucket/prefix) or a filesystem every node"
        " mounts at the same path (and set scaling.shared_filesystem: true)")
