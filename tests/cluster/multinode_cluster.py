"""A multi-node Ray cluster on one machine for the tests: a head and two worker nodes on 127.0.0.1, each
a separate raylet with 1 CPU and a custom resource naming it, started with Ray's own multi-node test
utility (ray.cluster_utils.Cluster). Prints one JSON line {"address", "nodes": {name: node_id}} once
all nodes are up, then keeps them up until its stdin closes.

    python tests/cluster/multinode_cluster.py RAY_TEMP_DIR
"""

from __future__ import annotations

import json
import os
import socket
import sys

# a node gets 30 s to register with its GCS by default: three raylets starting beside the suite's other
# pytest-xdist workers on 2 cores missed it once ("GCS cannot find the node ... before the timeout")
os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")

from ray.cluster_utils import Cluster  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(temp_dir: str) -> None:
    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "temp_dir": temp_dir,
              "object_store_memory": 80 * 1024 * 1024}
    cluster = Cluster(initialize_head=True, head_node_args={
        **common, "resources": {"node_head": 1}, "include_dashboard": False,
        # free ports, not the fixed defaults 8265 / 52365 another Ray instance may hold
        "dashboard_port": free_port(), "dashboard_agent_listen_port": free_port(),
    })
    try:
        nodes = {"node_head": cluster.head_node}
        for name in ("node_a", "node_b"):
            nodes[name] = cluster.add_node(**common, resources={name: 1})
        cluster.wait_for_nodes()
        print(json.dumps({"address": cluster.address,
                          "nodes": {name: node.node_id for name, node in nodes.items()}}), flush=True)
        sys.stdin.read()  # blocks until the test closes our stdin
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
