"""The door's settings: what an instance serves, and no open door without keys."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.settings import Settings, describe_settings_error


def test_a_door_beyond_localhost_needs_keys():
    with pytest.raises(ValidationError) as refused:
        Settings(http_port=8080, http_host="0.0.0.0")
    assert "without METALLM_API_KEYS" in describe_settings_error(refused.value)
    keyed = Settings(http_port=8080, http_host="0.0.0.0", api_keys=" k1, k2 ,")
    assert keyed.api_key_list() == ["k1", "k2"]
    assert "k1" not in repr(keyed)  # a secret


def test_a_local_door_needs_no_key_and_the_door_is_off_by_default():
    assert Settings().http_port is None
    assert Settings(http_port="off").http_port is None
    assert Settings(http_port=0).api_key_list() == []


def test_an_instance_serves_something():
    with pytest.raises(ValidationError, match="nothing to serve"):
        Settings(kafka_consumers=False)
    assert not Settings(kafka_consumers=False, http_port=0).kafka_consumers
