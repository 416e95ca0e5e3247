"""The worker's runtime: what RIVULET_MODEL is served as, when a SIGTERM ends the open streams, and when
a failed or stuck engine gets the worker replaced."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from models.errors import CheckpointError
from models.serving import ModelSpec, open_model, resolve_device
from service.lifecycle import engine_failure, shutdown_delay

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "models" / "demo"


def test_a_checkpoint_directory_is_served_as_an_llm():
    model = open_model(ModelSpec(DEMO, device="cpu"))
    assert (model.kind, model.name, model.context_length) == ("llm", "demo", 512)  # the demo's own context
    assert model.prompt_char_limit >= 512 and model.encode_prompt("hello")


def test_max_context_reaches_the_llm():
    assert open_model(ModelSpec(DEMO, device="cpu", max_context=64)).context_length == 64


def test_a_package_directory_is_served_as_a_package():
    model = open_model(ModelSpec(ROOT / "models" / "packages" / "words", device="cpu"))
    assert (model.kind, model.is_streaming, model.context_length) == ("package", True, None)
    assert model.parse_package_inputs({"prompt": "a b"})["prompt"] == "a b"


def test_a_directory_that_is_neither_fails_at_start_up(tmp_path):
    with pytest.raises(CheckpointError):
        open_model(ModelSpec(tmp_path))


def test_device_auto_picks_what_exists():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("graceful_timeout, delay", [(45, 43), (10, 8), (4, 2), (1, 0.5)])
def test_streams_are_ended_shortly_before_the_grace_time_runs_out(graceful_timeout, delay):
    assert shutdown_delay(graceful_timeout) == delay


class FakeEngine:
    def __init__(self, state="ready", was_ready=True, error=None, step_s=0.0):
        self.state, self.was_ready, self.error, self.step_s = state, was_ready, error, step_s

    def step_running_s(self, now):
        return self.step_s


def runtime_with(engine, make_settings, **settings):
    return SimpleNamespace(engine=engine, settings=make_settings(**settings))


@pytest.mark.parametrize("engine, failing", [
    (FakeEngine(), False),
    (FakeEngine(step_s=5.0), False),  # a long step is not a stuck one
    (FakeEngine(state="dead", was_ready=False, error="loading failed: no weights"), False),  # stays, 503
    (FakeEngine(state="dead", error="RuntimeError: CUDA error: an illegal memory access"), True),
    (FakeEngine(step_s=91.0), True),  # past twice the 40 s request timeout plus 10 s
])
def test_a_worker_is_replaced_when_its_engine_failed_or_is_stuck(engine, failing, make_settings):
    assert (engine_failure(runtime_with(engine, make_settings), now=0.0) is not None) == failing


def test_the_step_timeout_setting_bounds_a_step(make_settings):
    runtime = runtime_with(FakeEngine(step_s=3.0), make_settings, step_timeout_s=2.0)
    assert "RIVULET_STEP_TIMEOUT_S" in engine_failure(runtime, now=0.0)
