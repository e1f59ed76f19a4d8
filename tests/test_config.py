"""Config models: what users write is validated before anything starts."""

import pytest
from pydantic import ValidationError

from serving.config import AppConfig, Role, app_config_from_file
from tests.helpers.servers import REPO


def test_shipped_aggregated_config_validates():
    config, http = app_config_from_file(REPO / "configs/cpu-aggregated.yaml")
    assert http.host == "127.0.0.1"
    assert list(config.pools()) == [Role.AGGREGATED]
    assert config.model_name == "pdserve:tiny"


@pytest.mark.parametrize("args, fragment", [
    ({"aggregated": {}, "bogus": 1}, "bogus"),
    ({"aggregated": {"replicas": 2}}, "replicas"),
    ({}, "aggregated"),
    ({"aggregated": {}, "prefill": {}, "decode": {}}, "not both"),
    ({"prefill": {}}, "decode"),
    ({"aggregated": {"engine_kwargs": {"model": "x"}}}, "top level"),
    ({"aggregated": {"num_replicas": 0}}, "num_replicas"),
    ({"aggregated": {}, "router": {"policy": "random"}}, "policy"),
])
def test_bad_configs_are_rejected_with_the_field_named(args, fragment):
    with pytest.raises(ValidationError, match=fragment):
        AppConfig.model_validate(args)


def test_autoscaling_replaces_fixed_replicas():
    config = AppConfig.model_validate(
        {"aggregated": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4}}})
    assert config.aggregated.num_replicas is None


def test_unknown_engine_kwarg_is_a_clear_error():
    from serving.engine import build_vllm_args

    config = AppConfig.model_validate({"aggregated": {"engine_kwargs": {"dtpye": "float32"}}})
    with pytest.raises(TypeError, match="dtpye"):
        build_vllm_args(config, config.aggregated)


def test_api_key_from_environment(monkeypatch):
    monkeypatch.setenv("PDSERVE_API_KEY", "s3cret")
    assert AppConfig.model_validate({"aggregated": {}}).resolved_api_key() == "s3cret"


def test_shipped_prefix_aware_config_validates():
    from kvtransfer.config import PDConnectorConfig

    config, _ = app_config_from_file(REPO / "configs/cpu-pd-prefix.yaml")
    assert config.router.policy == "prefix_aware"
    assert (config.prefill.num_replicas, config.decode.num_replicas) == (1, 2)
    for pool in (config.prefill, config.decode):
        assert PDConnectorConfig.from_extra_config(pool.kv_connector).tiers is not None
