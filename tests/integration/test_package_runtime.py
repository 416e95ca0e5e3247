"""A package whose inferless-runtime-config.yaml is not met, under the real server: refused at start-up,
with the same message on /ready (503) and in the log, naming each unmet requirement and the pip command."""
from __future__ import annotations

import time
from pathlib import Path

import packaging
import requests

from tests.live_server import live_server

ROOT = Path(__file__).resolve().parents[2]
UNMET = ROOT / "tests" / "fixtures" / "packages" / "unmet_runtime"
WAIT_S = 60  # bound on the start-up; never asserted on


def test_unmet_python_packages_keep_ready_503_with_what_to_install(tmp_path):
    with live_server({"RIVULET_MODEL": str(UNMET), "RIVULET_DEVICE": "cpu"}, log_dir=tmp_path,
                     ready_status=503) as srv:
        deadline = time.monotonic() + WAIT_S
        while (body := requests.get(srv.url + "/ready", timeout=5).json()).get("error") is None:
            assert time.monotonic() < deadline, f"no start-up error on /ready: {body}"
            time.sleep(0.2)
        response = requests.get(srv.url + "/ready", timeout=5)
        log = srv.log()
    assert response.status_code == 503
    error = response.json()["error"]
    for text in ("rivulet-no-such-python-package==1.0: not installed",
                 f"packaging<1: packaging {packaging.__version__} is installed",
                 "-m pip install rivulet-no-such-python-package==1.0 'packaging<1'"):
        assert text in error
        assert text in log
    assert "app.py was imported" not in log  # refused before any of the package's code ran
    assert "unknown keys, ignored: build.python_version" in log
