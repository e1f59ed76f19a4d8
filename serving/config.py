"""Configuration users write: pydantic models loaded from YAML or dicts.

A config file is a Ray Serve config (`serve run FILE` and a RayService's
`serveConfigV2` take it as is); the application's `args` are an `AppConfig`.
"""

from __future__ import annotations

import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, field_validator,
                      model_validator)

from serving.placement import parse_cpu_list


def _cpu_list(value: str) -> str:
    parse_cpu_list(value)  # ValueError: pydantic reports it against the field
    return value


CpuList = Annotated[str, AfterValidator(_cpu_list)]


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Role(str, Enum):
    AGGREGATED = "aggregated"
    PREFILL = "prefill"
    DECODE = "decode"


class PoolConfig(StrictModel):
    """One pool of identical vLLM engine replicas."""

    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; leave null when autoscaling_config is set.")
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Ray Serve autoscaling config (min_replicas, max_replicas, "
                          "target_ongoing_requests, ...) for this pool.")
    max_ongoing_requests: int = Field(
        256, ge=1, description="Requests one replica accepts at once before Serve queues.")
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="Keyword arguments for vLLM's AsyncEngineArgs "
                                          "(dtype, max_model_len, block_size, ...).")
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment set in the replica before the engine "
                                          "starts, e.g. VLLM_CPU_OMP_THREADS_BIND for pinning.")
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1},
        description="Ray resources of one replica, e.g. {num_gpus: 1} on GPU nodes.")
    kv_connector: dict[str, Any] = Field(
        default_factory=dict, description="PDConnector settings (kv_connector_extra_config) "
                                          "of a prefill or decode pool: lease_s, host, ...")
    cpus: CpuList | None = Field(
        None, description="CPU engines: the CPUs (Linux list, e.g. '0' or '2-3') of this "
                          "pool's replica processes and vLLM's EngineCore, which busy-waits "
                          "on the worker through each step; the worker's compute threads "
                          "go where VLLM_CPU_OMP_THREADS_BIND puts them. Unset: they float "
                          "(serving/placement.py).")
    engine_cpus: CpuList | None = Field(
        None, description="CPU engines: the CPUs of vLLM's EngineCore alone, when it "
                          "should not share the replica's (`cpus`), e.g. its own worker's "
                          "core: the two hand the CPU to each other as each waits for the "
                          "other (their busy-waits yield), and the replica's per-token "
                          "work stays off both. Unset: `cpus` (serving/placement.py).")
    engine_nice: int | None = Field(
        None, ge=-20, le=19,
        description="CPU engines: the nice value of vLLM's EngineCore (every thread), "
                    "which schedules each step and answers the worker twice per step. "
                    "Below the serving processes' (Ray starts engines at 15, its "
                    "daemons at 0), it goes first on CPUs they share: one stream's "
                    "tokens come faster, but its busy-wait on the worker is taken from "
                    "whatever else shares them (a trade-off under "
                    "load, measured in serving/placement.py). Negative values need "
                    "CAP_SYS_NICE (root, or the capability granted to the container); "
                    "without it the replica warns and the EngineCore keeps its nice "
                    "value. Unset: unchanged.")

    @property
    def worker_in_engine(self) -> bool:
        """`distributed_executor_backend: uni`: the forward pass in the EngineCore
        process (serving/engine.py, serving/placement.py)."""
        return self.engine_kwargs.get("distributed_executor_backend") == "uni"

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "PoolConfig":
        if self.autoscaling_config is not None:
            self.num_replicas = None
        return self

    @field_validator("engine_kwargs")
    @classmethod
    def _no_model_in_engine_kwargs(cls, value: dict[str, Any]) -> dict[str, Any]:
        if "model" in value:
            raise ValueError("set the model at the top level ('model'), not in engine_kwargs")
        return value


class RouterConfig(StrictModel):
    """Assignment of requests to prefill and decode replicas (P/D deployments)."""

    policy: Literal["least_loaded", "round_robin", "conditional", "prefix_aware"] = Field(
        "least_loaded", description="Replica choice: least-loaded or round-robin (always "
                                   "remote prefill), prefix_aware (conditional, but the "
                                   "replica holding the longest prefix of the prompt wins "
                                   "unless its queue outweighs it), or conditional "
                                   "(least-loaded, local "
                                   "prefill for short prompts or a long prefill queue).")
    local_prefill_max_tokens: int = Field(
        64, ge=0, description="'conditional' policy: prompts with at most this many tokens "
                              "are prefilled by the decode replica itself.")
    prefill_queue_ratio: float = Field(
        4.0, gt=0, description="'conditional' policy: prefill locally when the prefill "
                               "pool's waiting requests per replica exceed this multiple of "
                               "decode's (plus one).")
    prefix_tokens_per_request: int = Field(
        512, ge=1, description="'prefix_aware' policy: matched prefix tokens worth one "
                               "request more in a replica's queue.")
    prefill_timeout_s: float = Field(
        30.0, gt=0, description="A remote prefill that takes longer is abandoned and the "
                                "decode replica prefills locally.")
    prefill_assign_timeout_s: float = Field(
        2.0, gt=0, description="A remote prefill that no prefill replica takes within this "
                               "time (the chosen one is gone and no other is up, or all are "
                               "full) is prefilled by the decode replica instead.")
    direct_calls: bool = Field(
        True, description="The ingress calls prefill and decode replicas on its own node "
                          "over a private Unix socket instead of Serve handles (about 4 ms "
                          "less per call, no Ray hop per streamed token). Pools with an "
                          "autoscaling_config always take Serve handles.")
    session_header: str = Field(
        "x-session-id", description="Requests with the same value of this header stay on "
                                    "one decode replica.")


class AppConfig(StrictModel):
    """The arguments of `serving.app:build_app`."""

    model: str = Field(
        "pdserve:tiny", description="Local HF model directory, hub id, or a built-in model "
                                    "('pdserve:tiny', 'pdserve:bench') built on first use.")
    served_model_name: str | None = Field(
        None, description="Name clients put in 'model'; defaults to `model`.")
    api_key: str | None = Field(
        None, description="If set (or PDSERVE_API_KEY), requests need "
                          "'Authorization: Bearer <key>'.")
    max_request_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Larger request bodies get HTTP 413.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="A request that has not finished by then is aborted (504).")
    aggregated: PoolConfig | None = Field(
        None, description="The aggregated pool: engines that prefill and decode. "
                          "Set this, or both 'prefill' and 'decode'.")
    prefill: PoolConfig | None = Field(
        None, description="The prefill pool of a disaggregated (P/D) deployment.")
    decode: PoolConfig | None = Field(
        None, description="The decode pool of a disaggregated (P/D) deployment.")
    router: RouterConfig = Field(
        default_factory=lambda: RouterConfig(), description="How requests are assigned "
                                                            "to replicas (P/D only).")
    serving_cpus: CpuList | None = Field(
        None, description="CPU engines: the CPUs (Linux list) of the ingress, the router "
                          "and, under `pdserve serve`, Ray's own processes, kept off the "
                          "engine workers' cores. Unset: they float (serving/placement.py).")

    @model_validator(mode="after")
    def _one_topology(self) -> "AppConfig":
        pd = (self.prefill is not None, self.decode is not None)
        if self.aggregated is not None and any(pd):
            raise ValueError("set either 'aggregated' or 'prefill' and 'decode', not both")
        if self.aggregated is None and not all(pd):
            raise ValueError("configure the 'aggregated' pool, or both 'prefill' and 'decode'")
        return self

    @property
    def is_disaggregated(self) -> bool:
        return self.aggregated is None

    def pools(self) -> dict[Role, PoolConfig]:
        if self.aggregated is not None:
            return {Role.AGGREGATED: self.aggregated}
        return {Role.PREFILL: self.prefill, Role.DECODE: self.decode}

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def resolved_api_key(self) -> str | None:
        return self.api_key or os.environ.get("PDSERVE_API_KEY") or None


class HTTPOptions(StrictModel):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)


def load_serve_config(path: str | Path) -> dict[str, Any]:
    """Read a Serve config file (the format `serve run FILE` takes)."""
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or not data.get("applications"):
        raise ValueError(f"{path}: not a Serve config (no 'applications' list)")
    return data


def app_config_from_file(path: str | Path) -> tuple[AppConfig, HTTPOptions]:
    data = load_serve_config(path)
    apps = data["applications"]
    if len(apps) != 1:
        raise ValueError(f"{path}: expected exactly one application, found {len(apps)}")
    http = data.get("http_options") or {}
    return (AppConfig.model_validate(apps[0].get("args") or {}),
            HTTPOptions(host=http.get("host", "127.0.0.1"), port=http.get("port", 8000)))
