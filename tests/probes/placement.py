"""Two-node cluster on one machine (own Ray, run as a separate process by the test): the
browser pool must land only on the browser-labelled node; a pool whose label matches no node
stays pending and /health-style status reports it. Prints one JSON line with the findings."""

from __future__ import annotations

import json
import os
import socket
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray import serve as ray_serve
    from ray.cluster_utils import Cluster

    from actors.pools import ExecutorPool

    prefix = sys.argv[1]
    redis_url = sys.argv[2]
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": False})
    worker = cluster.add_node(num_cpus=1, resources={"browser": 2},
                              labels={"cpa-browser": "true"})
    out: dict[str, object] = {}
    try:
        ray.init(address=cluster.address, log_to_driver=False)
        out["head"] = cluster.head_node.node_id
        out["browser_node"] = worker.node_id
        ray_serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
        settings = {"redis": {"url": redis_url, "key_prefix": prefix}}
        browser = ExecutorPool.options(  # type: ignore[attr-defined]
            num_replicas=2,
            ray_actor_options={"num_cpus": 0, "resources": {"browser": 1},
                               "label_selector": {"cpa-browser": "true"}},
        ).bind(capability="browser", executor="actors.executors.testing:SessionProbe",
               workers=1, settings=settings, grace_s=1.0)
        handle = ray_serve.run(browser, name="pool-browser", route_prefix=None)
        nodes = set()
        deadline = time.monotonic() + 30
        while len(nodes) < 2 and time.monotonic() < deadline:
            status = handle.status.remote().result(timeout_s=30)
            nodes.add((status["replica"], status["node_id"]))
        out["browser_replicas"] = sorted(nodes)
        nowhere = ExecutorPool.options(  # type: ignore[attr-defined]
            num_replicas=1,
            ray_actor_options={"num_cpus": 0, "label_selector": {"cpa-windows": "true"}},
        ).bind(capability="windows", executor="actors.executors.noop:NoopExecutor",
               workers=1, settings=settings)
        # serve.run would wait until the application runs, which this one never does.
        from ray.serve.api import RunTarget

        ray_serve.run_many([RunTarget(nowhere, name="pool-windows", route_prefix=None)],
                           wait_for_ingress_deployment_creation=False,
                           wait_for_applications_running=False)
        st = None
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            time.sleep(1)
            st = ray_serve.status().applications.get("pool-windows")
            if st is not None and st.deployments:
                dep = next(iter(st.deployments.values()))
                if dep.replica_states and time.monotonic() > deadline - 22:
                    break
        assert st is not None
        dep = next(iter(st.deployments.values()))
        out["windows_status"] = str(st.status.value)
        out["windows_replica_states"] = dict(dep.replica_states)
    finally:
        try:
            ray_serve.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()
    print("RESULT " + json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
