"""The worker's runtime: which backend serves RIVULET_MODEL, and when a SIGTERM ends the open streams."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from models.errors import CheckpointError
from models.llm_backend import LlamaBackend
from models.package import PackageBackend
from service.lifecycle import build_backend, resolve_device, shutdown_delay

ROOT = Path(__file__).resolve().parents[2]


def test_a_checkpoint_directory_is_served_as_an_llm(make_settings):
    backend = build_backend(make_settings(device="cpu"))
    assert isinstance(backend, LlamaBackend) and backend.name == "demo"
    assert backend.context_length == 512  # the demo's own context


def test_max_context_reaches_the_llm_backend(make_settings):
    assert build_backend(make_settings(device="cpu", max_context=64)).context_length == 64


def test_a_package_directory_is_served_as_a_package(make_settings):
    backend = build_backend(make_settings(model=ROOT / "models" / "packages" / "words", device="cpu"))
    assert isinstance(backend, PackageBackend) and backend.kind == "package"


def test_a_directory_that_is_neither_fails_at_start_up(make_settings, tmp_path):
    with pytest.raises(CheckpointError):
        build_backend(make_settings(model=tmp_path))


def test_device_auto_picks_what_exists():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cuda:1") == torch.device("cuda:1")


@pytest.mark.parametrize("graceful_timeout, delay", [(45, 43), (10, 8), (4, 2), (1, 0.5)])
def test_streams_are_ended_shortly_before_the_grace_time_runs_out(graceful_timeout, delay):
    assert shutdown_delay(graceful_timeout) == delay
