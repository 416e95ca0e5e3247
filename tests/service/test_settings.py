"""Settings: defaults, RIVULET_* variables, validation that names the variable."""
from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEMO_MODEL_DIR, Settings, SettingsError


def test_defaults_match_design():
    s = Settings.from_env({})
    assert s.model == DEMO_MODEL_DIR and (DEMO_MODEL_DIR / "config.json").is_file()
    assert (s.device, s.api_keys, s.max_body_bytes, s.request_timeout_s) == ("auto", (), 12582912, 40)
    assert (s.max_batch, s.max_waiting, s.heartbeat_s, s.max_context) == (32, 256, 15, None)
    assert (s.cors_origins, s.stream_reader_grace_s, s.stream_retention_s) == ((), 30, 300)
    assert (s.stream_max_events, s.stream_max_bytes, s.stream_total_bytes) == (4096, 4 * 2**20, 256 * 2**20)
    assert s.test_hooks is False and not s.auth_enabled


def test_environment_variables_are_read():
    s = Settings.from_env({
        "RIVULET_MODEL": "/models/llama", "RIVULET_DEVICE": "cuda:1", "RIVULET_API_KEYS": " a, b ,,c ",
        "RIVULET_MAX_BODY_BYTES": "100", "RIVULET_REQUEST_TIMEOUT_S": "2.5", "RIVULET_MAX_BATCH": "4",
        "RIVULET_MAX_WAITING": "8", "RIVULET_HEARTBEAT_S": "0.5", "RIVULET_MAX_CONTEXT": "1024",
        "RIVULET_CORS_ORIGINS": "https://a.example,https://b.example", "RIVULET_TEST_HOOKS": "true",
        "UNRELATED": "x",
    })
    assert s.model == Path("/models/llama") and s.device == "cuda:1"
    assert s.api_keys == ("a", "b", "c") and s.auth_enabled
    assert (s.max_body_bytes, s.request_timeout_s, s.max_batch, s.max_waiting, s.heartbeat_s) == (100, 2.5, 4, 8, 0.5)
    assert s.cors_origins == ("https://a.example", "https://b.example")
    assert s.test_hooks is True and s.max_context == 1024


def test_quantization_is_none_unless_int8_is_asked_for():
    assert Settings.from_env({}).quant == "none"
    assert Settings.from_env({"RIVULET_QUANT": "int8"}).quant == "int8"


def test_empty_variable_keeps_the_default():
    assert Settings.from_env({"RIVULET_MAX_BATCH": "", "RIVULET_API_KEYS": "  "}).max_batch == 32


def test_overrides_win_over_environment():
    assert Settings.from_env({"RIVULET_MAX_BATCH": "4"}, max_batch=2).max_batch == 2


@pytest.mark.parametrize("variable, value", [
    ("RIVULET_MAX_BATCH", "many"),
    ("RIVULET_MAX_BATCH", "0"),
    ("RIVULET_MAX_WAITING", "0"),
    ("RIVULET_MAX_CONTEXT", "1"),
    ("RIVULET_REQUEST_TIMEOUT_S", "-1"),
    ("RIVULET_HEARTBEAT_S", "0"),
    ("RIVULET_DEVICE", "gpu"),
    ("RIVULET_TEST_HOOKS", "perhaps"),
    ("RIVULET_QUANT", "int4"),
])
def test_bad_values_name_the_variable(variable, value):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({variable: value})


def test_settings_are_frozen():
    s = Settings.from_env({})
    with pytest.raises(ValidationError):
        s.max_batch = 3


def test_authentication_settings_keep_their_names():
    s = Settings.from_env({"RIVULET_ACCESS_KEYS": "/run/secrets/aksk", "RIVULET_APP_KEYS": "/run/secrets/apps",
                           "RIVULET_APP_CODES": "code-1, code-2", "RIVULET_SIGNATURE_MAX_SKEW_S": "60"})
    assert (s.access_keys, s.app_keys) == (Path("/run/secrets/aksk"), Path("/run/secrets/apps"))
    assert s.app_codes == ("code-1", "code-2") and s.signature_max_skew_s == 60 and s.auth_enabled
    defaults = Settings.from_env({})
    assert (defaults.access_keys, defaults.app_keys, defaults.app_codes) == (None, None, ())
    assert defaults.signature_max_skew_s == 900
    assert Settings.from_env({"RIVULET_APP_CODES": "c"}).auth_enabled


def test_cuda_graphs_are_on_unless_turned_off():
    assert Settings.from_env({}).cuda_graphs is True
    assert Settings.from_env({"RIVULET_CUDA_GRAPHS": "0"}).cuda_graphs is False
    assert Settings.from_env({"RIVULET_CUDA_GRAPHS": "false"}).cuda_graphs is False
    with pytest.raises(SettingsError, match="RIVULET_CUDA_GRAPHS"):
        Settings.from_env({"RIVULET_CUDA_GRAPHS": "sometimes"})
