"""Helpers shared by the tests that start the Serve endpoint on 127.0.0.1."""
from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def endpoint_config(port: int | None = None) -> dict:
    """jobs/configs/serve.yaml with a quarter CPU per replica and one replica, on loopback."""
    from jobs.options import shipped_config
    from pipelines.serve.control import load_serve_config

    data = load_serve_config(shipped_config("serve"))
    deployment = data["applications"][0]["deployments"][0]
    deployment["ray_actor_options"] = {"num_cpus": 0.25}
    deployment["autoscaling_config"].update(min_replicas=1, max_replicas=1)
    data["http_options"].update(host="127.0.0.1", port=port or free_port())
    return data
