"""Keep a single-host pdserve on 127.0.0.1: every listener of Ray, Serve, vLLM and UCX.

Left alone, a local Ray replaces a loopback node address with the host's routable IP
(and its gRPC servers then listen on every interface), vLLM binds its sockets to the
host's IP, UCX's tcp transport listens on every network device, and each Serve replica
opens its inter-deployment gRPC server on `[::]:0` (hard-coded in Ray 2.60).

`loopback_env()` is set in the `pdserve serve` process before Ray is imported, and every
process Ray starts inherits it; `worker_setup` runs in each Ray worker process
(`worker_process_setup_hook`) and rebinds Serve's replica gRPC server to 127.0.0.1.
A server that must be reachable from other hosts sets PDSERVE_NODE_IP and gets none of
this.
"""

from __future__ import annotations

LOOPBACK = "127.0.0.1"


def loopback_env() -> dict[str, str]:
    return {
        # Ray's single-host mode (the default on macOS and Windows): the node IP stays
        # 127.0.0.1 and Ray's gRPC servers listen on it only.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "VLLM_HOST_IP": LOOPBACK,
        # UCX's tcp transport, when it is used at all, on the loopback device only;
        # shared memory and CMA are not network devices and are unaffected.
        "UCX_NET_DEVICES": "lo",
    }


def worker_setup() -> None:
    """Ray `worker_process_setup_hook`: Serve replicas' gRPC server on 127.0.0.1."""
    from ray.serve._private import replica

    bind = replica.add_port_to_grpc_server
    if getattr(bind, "pdserve_loopback", False):
        return

    def bind_loopback(server, address: str):
        host, _, port = address.rpartition(":")
        return bind(server, f"{LOOPBACK}:{port}" if host in ("[::]", "0.0.0.0") else address)

    bind_loopback.pdserve_loopback = True
    replica.add_port_to_grpc_server = bind_loopback
