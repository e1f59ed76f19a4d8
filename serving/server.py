"""`pdserve serve CONFIG`: start a local Ray, deploy the app, stay in the foreground,
and shut Ray and the engines down cleanly on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time

from serving.config import app_config_from_file
from serving.loopback import LOOPBACK, loopback_env
from serving.placement import LAUNCH_CPUS_ENV, format_cpu_list, place_serving
from serving.ports import free_port

logger = logging.getLogger("pdserve")


def _curl_line(host: str, port: int, model: str, api_key: str | None) -> str:
    body = json.dumps({"model": model, "prompt": "Hello, my name is", "max_tokens": 16})
    auth = f" -H 'Authorization: Bearer {api_key}'" if api_key else ""
    return (f"curl http://{host}:{port}/v1/completions -H 'Content-Type: application/json'"
            f"{auth} -d '{body}'")


def _direct_ingress(port: int, host: str) -> int:
    """Serve's direct ingress: the ingress replica itself listens on `port`, so a request
    skips the HTTP proxy actor's extra process hop (about 6 ms per request and a hop per
    streamed token, measured here). Serve still runs its proxy; it moves to a free port
    on `host`. Returns that port. One ingress replica per node (the port range is one
    port wide)."""
    os.environ.setdefault("RAY_SERVE_ENABLE_DIRECT_INGRESS", "1")
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", str(port))
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", str(port + 1))
    # Serve keeps a stopping ingress answering for 30 s, for a load balancer in front
    # to notice; a foreground server with none would take 35 s to stop.
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    return free_port(host)


def _place_ray(serving_cpus: str | None) -> None:
    """With `serving_cpus`, this process moves there before it starts Ray, and so does
    every process Ray starts; engine replicas widen back to the CPUs it had
    (serving/placement.py)."""
    if serving_cpus is not None:
        os.environ.setdefault(LAUNCH_CPUS_ENV, format_cpu_list(os.sched_getaffinity(0)))
        place_serving(serving_cpus)


def serve_foreground(config_path: str, host: str | None = None,
                     port: int | None = None, metrics_port: int | None = None) -> int:
    """`metrics_port`: where Ray's metrics agent serves Prometheus text (vLLM's engine
    metrics, Ray's, Serve's), on the node's address; None: a free port, logged."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    config, http = app_config_from_file(config_path)
    host = host or http.host
    port = http.port if port is None else port

    node_ip = os.environ.get("PDSERVE_NODE_IP", LOOPBACK)
    runtime_env = {}
    if node_ip == LOOPBACK:  # before Ray is imported; every process it starts inherits it
        for key, value in loopback_env().items():
            os.environ.setdefault(key, value)
        runtime_env["worker_process_setup_hook"] = "serving.loopback.worker_setup"
    proxy_port = port
    if os.environ.get("PDSERVE_DIRECT_INGRESS", "1") == "1":
        port = port or free_port(host)
        proxy_port = _direct_ingress(port, host)

    _place_ray(config.serving_cpus)
    # Ray starts its workers (replicas, engines) at nice 15, but only the thread that
    # renices itself and those it starts later: the worker's RPC threads stay at 0, as
    # do Ray's daemons, and on a shared core they went ahead of the replica's per-token
    # work (serving/placement.py). One nice value for every process and thread.
    os.environ.setdefault("RAY_worker_niceness", "0")

    import ray
    from ray import serve

    from serving.app import build_app

    started = time.monotonic()
    # A cluster of our own, every listener on the loopback interface unless asked.
    ray.init(address="local", _node_ip_address=node_ip, runtime_env=runtime_env,
             include_dashboard=False, _metrics_export_port=metrics_port,
             logging_level=logging.WARNING,
             log_to_driver=os.environ.get("PDSERVE_ENGINE_LOGS", "1") == "1")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": proxy_port}, proxy_location="HeadOnly")
        serve.run(build_app(config), name="pdserve", route_prefix="/", blocking=False)
        logger.info("pdserve ready in %.1f s on http://%s:%d (model %s)",
                    time.monotonic() - started, host, port, config.model_name)
        logger.info("engine and Ray metrics on http://%s:%d/metrics", node_ip,
                    ray.nodes()[0]["MetricsExportPort"])
        print("Ready. Try:\n  " + _curl_line(host, port, config.model_name,
                                              config.resolved_api_key()), flush=True)
        while not stop.wait(1.0):
            pass
        logger.info("shutting down")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0
