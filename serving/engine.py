"""The engine deployment: one vLLM `AsyncLLM` per replica behind vLLM's own OpenAI
serving layer (request validation, chat templates, sampling, SSE chunks).

A replica answers `generate(endpoint, body)`, an async generator, always called as a
stream by the ingress. Its first item says what kind of reply follows:
  - a dict: the whole reply (a response body, or an error body with `error.code`);
  - a str: the first SSE event of a stream, followed by the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import logging
import time
from typing import Any, AsyncIterator

from ray import serve

from serving.config import AppConfig, PoolConfig, Role
from serving.direct import DirectServer
from serving.metrics import KVTransferTotals
from serving.model import resolve_model
from serving.placement import place_engine, prioritize_engine, usable, widen_for_engine
from serving.prefix import RESYNC, TIER_KEYS, HashSpec, HeldBlocks
from serving.protocol import validate_request
from serving.router import RouterClient

logger = logging.getLogger("pdserve.engine")

ENDPOINTS = ("completions", "chat")
KV_ROLES = {Role.PREFILL: "kv_producer", Role.DECODE: "kv_consumer"}
REPORT_INTERVAL_S = 0.5
HEARTBEAT_S = 2.0
# vLLM reports its counts with a step's outputs, so an abort that empties the engine
# leaves the last ones standing; with none of our requests in flight, counts this old
# are taken as stale (a running engine reports every step, a few ms apart).
STALE_COUNTS_S = 0.25
# Key a prefill replica adds to its reply: seconds the request spent in this replica.
ENGINE_SECONDS_KEY = "pdserve_engine_seconds"
GRACEFUL_SHUTDOWN_S = 5.0  # Serve's limit for a stopping replica's requests and __del__
DIRECT_DRAIN_S = GRACEFUL_SHUTDOWN_S - 1.5  # ... of which direct calls get this much


def _kv_transfer_config(pool: PoolConfig, role: Role) -> Any:
    from vllm.config import KVTransferConfig

    return KVTransferConfig(kv_connector="PDConnector", kv_connector_module_path="kvtransfer",
                            kv_role=KV_ROLES[role], kv_load_failure_policy="recompute",
                            kv_connector_extra_config=dict(pool.kv_connector))


def build_vllm_args(config: AppConfig, pool: PoolConfig,
                    role: Role = Role.AGGREGATED) -> argparse.Namespace:
    """vLLM's flat argument namespace (frontend + engine args), as its server builds it.

    Unknown keys in `engine_kwargs` raise TypeError naming the key.
    """
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.entrypoints.launchers.cli_args import FrontendArgs

    frontend_only = ({f.name for f in dataclasses.fields(FrontendArgs)}
                     - {f.name for f in dataclasses.fields(AsyncEngineArgs)})
    kwargs = dict(pool.engine_kwargs)
    frontend_kwargs = {k: kwargs.pop(k) for k in list(kwargs) if k in frontend_only}
    if role in KV_ROLES:
        kwargs["kv_transfer_config"] = _kv_transfer_config(pool, role)
    if pool.worker_in_engine:
        # The worker in the EngineCore process. vLLM's CPU platform turns the name "uni"
        # into "mp" (a worker process of its own); the class itself it takes as it is.
        from vllm.v1.executor.uniproc_executor import UniProcExecutor

        kwargs["distributed_executor_backend"] = UniProcExecutor
    engine_args = AsyncEngineArgs(model=resolve_model(config.model),
                                  served_model_name=[config.model_name], **kwargs)
    frontend_args = FrontendArgs(**frontend_kwargs)
    return argparse.Namespace(**(vars(frontend_args) | vars(engine_args)))


def _worker_binding(vllm_config: Any) -> contextlib.AbstractContextManager:
    """The environment in which vLLM starts a CPU worker process (OpenMP's thread count
    and core binding, from `VLLM_CPU_OMP_THREADS_BIND`), set while the EngineCore
    process is started, for an EngineCore that is its own worker (UniProcExecutor)."""
    from vllm.utils.ompmultiprocessing import OMPProcessManager

    return OMPProcessManager(vllm_config).configure_omp_envs(rank=0, local_rank=0)


def _yield_between_outputs(engine: Any) -> None:
    """Let readers take one engine step's outputs before the next step's are handed out.

    vLLM's output handler awaits the engine's outputs from a queue and puts each
    request's into its collector, which merges it into an output its reader has not
    taken yet. When two steps' outputs wait in the queue (the EngineCore sent them
    together, or this replica was held up a moment), the await returns at once, the
    handler goes on to the second without the event loop running the readers, and two
    tokens leave in one SSE event. One yield before each take lets every reader that is
    ready take its output first; a reader that is really behind still gets its outputs
    merged, as vLLM intends."""
    client = engine.engine_core
    take = client.get_output_async

    async def get_output_async():
        await asyncio.sleep(0)
        return await take()

    client.get_output_async = get_output_async


def _record_stats_after_readers(engine: Any) -> None:
    """Record each engine step's stats after the readers its outputs woke.

    vLLM's output handler hands a step's outputs to the requests' collectors, then
    records the step's stats (vLLM's metrics, through Ray, and this replica's load
    numbers) before any reader has run: every token waited for them, 0.2 ms a step
    (p50, decode replica, measured here; vLLM's own Prometheus logger took 0.09). Put
    on the loop with `call_soon`, the record runs after the readers, whose wake-ups the
    outputs scheduled first, and before the handler takes the next step: once a step,
    in order. A record that fails is logged by the loop and the stream goes on (in the
    handler it failed every request)."""
    manager = engine.logger_manager
    if manager is None:  # stats disabled
        return
    record = manager.record
    loop = asyncio.get_running_loop()

    def record_later(*args: Any, **kwargs: Any) -> None:
        loop.call_soon(functools.partial(record, *args, **kwargs))

    manager.record = record_later


class LoadStatLogger:
    """Keeps the latest scheduler numbers of the local engine for the router."""

    def __init__(self, vllm_config: Any = None, engine_index: int = 0):
        self.num_running = 0
        self.num_waiting = 0
        self.reported_at = 0.0  # time.monotonic() of the last scheduler numbers
        self.kv_cache_usage = 0.0
        # cumulative token counts: prompt tokens the connector supplied (external hits)
        # out of those it was asked about, and local prefix-cache hits
        self.counters = {"external_hit_tokens": 0, "external_query_tokens": 0,
                         "local_hit_tokens": 0}
        self.kv_transfer = KVTransferTotals()
        self.held = HeldBlocks()  # block hashes the connector's tiers hold

    def record(self, scheduler_stats: Any, iteration_stats: Any,
               mm_cache_stats: Any = None, engine_idx: int = 0) -> None:
        if scheduler_stats is None:
            return
        self.reported_at = time.monotonic()
        self.num_running = scheduler_stats.num_running_reqs
        self.num_waiting = scheduler_stats.num_waiting_reqs
        self.kv_cache_usage = scheduler_stats.kv_cache_usage
        external = scheduler_stats.connector_prefix_cache_stats
        if external is not None:
            self.counters["external_hit_tokens"] += external.hits
            self.counters["external_query_tokens"] += external.queries
        self.counters["local_hit_tokens"] += scheduler_stats.prefix_cache_stats.hits
        if scheduler_stats.kv_connector_stats:
            self.kv_transfer.observe(scheduler_stats.kv_connector_stats)
            keys = scheduler_stats.kv_connector_stats.get(TIER_KEYS)
            if keys is not None:
                self.held.apply(keys)

    def counts(self, in_flight: bool) -> tuple[int, int]:
        """(running, waiting) for the router: as last reported, or none when none of the
        replica's calls is in flight and no report came for STALE_COUNTS_S."""
        if not in_flight and time.monotonic() - self.reported_at > STALE_COUNTS_S:
            return 0, 0
        return self.num_running, self.num_waiting

    def log_engine_initialized(self) -> None:
        pass

    def log(self) -> None:
        pass

    def record_sleep_state(self, is_awake: int, level: int) -> None:
        pass


class EngineServer:
    """One vLLM engine (aggregated, prefill or decode role) and its OpenAI handlers."""

    async def __init__(self, config: dict, role: str, router: Any = None):
        widen_for_engine()  # first: vLLM's imports and start-up use every core
        from starlette.datastructures import State
        from vllm.entrypoints.openai.api_server import init_app_state
        from vllm.utils.gc_utils import freeze_gc_heap
        from vllm.v1.engine.async_llm import AsyncLLM
        from vllm.v1.metrics.loggers import StatLoggerBase
        from vllm.v1.metrics.ray_wrappers import RayPrometheusStatLogger

        self.config = AppConfig.model_validate(config)
        self.role = Role(role)
        self.replica_id = _replica_id()
        pool = self.config.pools()[self.role]
        # Refused before the engine starts, not after.
        cpus = usable(pool.cpus, "cpus") if pool.cpus is not None else None
        engine_cpus = (usable(pool.engine_cpus, "engine_cpus")
                       if pool.engine_cpus is not None else None)
        started = time.monotonic()
        args = build_vllm_args(self.config, pool, self.role)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext

        engine_args = AsyncEngineArgs.from_cli_args(args)
        vllm_config = engine_args.create_engine_config(UsageContext.ENGINE_CONTEXT)
        self.load = LoadStatLogger()
        self._in_flight = 0  # calls of generate() (and so prefill()) not yet ended
        StatLoggerBase.register(LoadStatLogger)  # vLLM checks the ABC, not duck typing
        with (_worker_binding(vllm_config) if pool.worker_in_engine
              else contextlib.nullcontext()):
            # vLLM's engine metrics (vllm:*) through Ray's metrics agent, as Ray Serve
            # LLM exports them: on each node's Ray metrics port (KubeRay's 8080;
            # `pdserve serve --metrics-port`), labelled with the Serve replica. In its
            # place vLLM would record them in this process's own registry, which no
            # endpoint serves.
            self.engine = AsyncLLM.from_vllm_config(
                vllm_config, stat_loggers=[RayPrometheusStatLogger,
                                           lambda *a, **k: self.load],
                enable_log_requests=engine_args.enable_log_requests,
                disable_log_stats=engine_args.disable_log_stats)
        _yield_between_outputs(self.engine)
        _record_stats_after_readers(self.engine)
        # Its EngineCore is up: the compute threads (its workers', or its own) are bound.
        place_engine(cpus, engine_cpus, pool.worker_in_engine)
        prioritize_engine(pool.engine_nice)
        self.state = State()
        tasks = await self.engine.get_supported_tasks()
        await init_app_state(self.engine, self.state, args, supported_tasks=tasks)
        self.handlers = {"completions": self.state.openai_serving_completion,
                         "chat": self.state.openai_serving_chat}
        self.started_s = time.monotonic() - started
        spec = HashSpec.of_engine(self.engine.vllm_config)
        self.hash_spec = dataclasses.asdict(spec) if spec is not None else None
        self._tracks_blocks = pool.kv_connector.get("tiers") is not None
        logger.info("engine %s (%s) ready in %.1f s", self.replica_id, self.role.value,
                    self.started_s)
        self._direct = self._direct_server(pool)
        self._router = RouterClient(router) if router is not None else None
        self._reporter = (asyncio.get_running_loop().create_task(self._report_load())
                          if router is not None else None)
        # Leave what start-up made (vLLM, torch, transformers: about a million objects)
        # out of every later garbage collection, as vLLM's own API server does. Unfrozen,
        # each full collection walks them all: 0.35-0.45 s here, a stall of every request
        # and stream of this process.
        freeze_gc_heap()

    async def generate(self, endpoint: str, body: dict,
                       replica_id: str | None = None) -> AsyncIterator[str | dict]:
        """Run one OpenAI request; see the module docstring for what it yields.

        `replica_id` is read by Serve's request router (PinnedReplicaRouter) only.
        """
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse

        handler = self.handlers.get(endpoint)
        if handler is None:
            raise ValueError(f"unknown endpoint {endpoint!r}; known: {ENDPOINTS}")
        request = validate_request(endpoint, body)
        create = (handler.create_completion if endpoint == "completions"
                  else handler.create_chat_completion)
        self._in_flight += 1
        try:
            result = await create(request, None)
            if isinstance(result, ErrorResponse):
                yield result.model_dump()
            elif hasattr(result, "model_dump"):
                yield result.model_dump(exclude_none=False)
            else:
                async for event in result:
                    yield event
        finally:
            self._in_flight -= 1

    async def prefill(self, endpoint: str, body: dict, replica_id: str | None = None) -> dict:
        """Run a non-streamed request (the P/D prefill: `max_tokens=1`, `do_remote_decode`)
        and return its whole reply, plus `ENGINE_SECONDS_KEY`: the time it took here.

        A plain call, not a stream: one Serve hop with one reply.
        """
        started = time.perf_counter()
        replies = self.generate(endpoint, {**body, "stream": False}, replica_id)
        try:
            reply = await replies.__anext__()
        finally:
            await replies.aclose()
        reply[ENGINE_SECONDS_KEY] = time.perf_counter() - started
        return reply

    def _direct_server(self, pool: PoolConfig) -> DirectServer | None:
        """The same-node socket the ingress calls instead of this replica's Serve handle
        (serving/direct.py): P/D pools of a fixed size, unless configured off. An
        autoscaled pool takes every call through Serve, whose autoscaler counts them."""
        if (self.role not in KV_ROLES or not self.config.router.direct_calls
                or pool.autoscaling_config is not None):
            return None
        import ray

        server = DirectServer({"prefill": self.prefill}, {"generate": self.generate})
        self._direct_endpoint = {"node": ray.get_runtime_context().get_node_id(),
                                 "address": server.address}
        return server

    async def models(self) -> dict:
        listing = await self.state.openai_serving_models.show_available_models()
        return listing.model_dump()

    async def stats(self) -> dict:
        running, waiting = self.load.counts(self._in_flight > 0)
        stats = {"replica_id": self.replica_id, "role": self.role.value,
                 "num_running": running, "num_waiting": waiting,
                 "kv_cache_usage": self.load.kv_cache_usage, "started_s": self.started_s,
                 "counters": dict(self.load.counters), "hash_spec": self.hash_spec}
        if self.role in KV_ROLES:
            stats["kv_transfer"] = self.load.kv_transfer.as_dict()
        if self._direct is not None:
            stats["direct"] = self._direct_endpoint
        return stats

    async def check_health(self) -> None:
        await self.engine.check_health()

    async def _report_load(self) -> None:
        """Report on change (within REPORT_INTERVAL_S), and as a heartbeat when idle.
        With tiers, a report carries the changes to the held block hashes."""
        last, last_sent = None, 0.0
        held = self.load.held
        while True:
            stats = await self.stats()
            key = (stats["num_running"], stats["num_waiting"], stats["kv_cache_usage"],
                   tuple(stats["counters"].values()), repr(stats.get("kv_transfer")))
            if (key != last or time.monotonic() - last_sent >= HEARTBEAT_S
                    or (self._tracks_blocks and held.has_update)):
                if self._tracks_blocks:
                    stats["blocks"] = held.take_update()
                try:
                    answer = await self._router.call("report", stats)
                    last, last_sent = key, time.monotonic()
                    if answer and answer.get(RESYNC):
                        held.resync()
                except Exception:  # the router restarts; reports resume when it is back
                    held.resync()
                    logger.debug("load report failed", exc_info=True)
            await asyncio.sleep(REPORT_INTERVAL_S)

    async def __del__(self) -> None:
        """Serve awaits this when it stops the replica (it takes an async __del__), after
        the requests its handles routed here are done. Those over the direct socket are
        not among them: the router stops assigning this replica, and calls in flight get
        up to DIRECT_DRAIN_S; callers of any left then see the socket close, as a
        replica death."""
        direct = getattr(self, "_direct", None)
        if direct is not None:
            if self._reporter is not None:
                self._reporter.cancel()  # a later report would make it assignable again
            if self._router is not None:
                try:
                    await asyncio.wait_for(self._router.call("mark_failed", self.replica_id),
                                           1.0)
                except Exception:
                    logger.warning("could not take %s off the router", self.replica_id)
            left = await direct.drain(DIRECT_DRAIN_S)
            if left:
                logger.warning("stopping with %d direct calls in flight", left)
            direct.close()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (tests that construct the class directly)
        return "local"


def engine_deployment(pool: PoolConfig, role: Role, name: str) -> serve.Deployment:
    """The Serve deployment for one pool, with its scaling and resources."""
    actor_options = dict(pool.ray_actor_options)
    if pool.env:
        runtime_env = dict(actor_options.get("runtime_env") or {})
        runtime_env["env_vars"] = {**runtime_env.get("env_vars", {}), **pool.env}
        actor_options["runtime_env"] = runtime_env
    options: dict[str, Any] = {
        "name": name, "ray_actor_options": actor_options,
        "max_ongoing_requests": pool.max_ongoing_requests,
        "health_check_period_s": 10, "health_check_timeout_s": 30,
        "graceful_shutdown_timeout_s": GRACEFUL_SHUTDOWN_S,
    }
    if role in KV_ROLES:
        from ray.serve.config import RequestRouterConfig

        options["request_router_config"] = RequestRouterConfig(
            request_router_class="serving.replica_router.PinnedReplicaRouter")
    if pool.autoscaling_config is not None:
        options["autoscaling_config"] = pool.autoscaling_config
    else:
        options["num_replicas"] = pool.num_replicas
    return serve.deployment(EngineServer).options(**options)
