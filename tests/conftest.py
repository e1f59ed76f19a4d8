"""Shared fixtures: the real aggregated server (Ray Serve + vLLM CPU, tiny model)."""

from __future__ import annotations

import pytest

from serving.config import app_config_from_file
from tests.helpers.servers import REPO, running_server

AGGREGATED_CONFIG = "configs/cpu-aggregated.yaml"
API_KEY = "test-key"


@pytest.fixture(scope="session")
def aggregated_config():
    config, _ = app_config_from_file(REPO / AGGREGATED_CONFIG)
    return config


@pytest.fixture(scope="session")
def aggregated_server():
    """`pdserve serve configs/cpu-aggregated.yaml` with an API key, as a user starts it."""
    with running_server(AGGREGATED_CONFIG, env={"PDSERVE_API_KEY": API_KEY}) as server:
        yield server


@pytest.fixture(scope="session")
def client(aggregated_server):
    import openai

    return openai.OpenAI(base_url=aggregated_server.base_url + "/v1", api_key=API_KEY,
                         max_retries=0, timeout=120)
