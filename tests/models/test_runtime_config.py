"""inferless-runtime-config.yaml: reading it, and the start-up check of what it asks for."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import packaging
import pytest
import torch

from models.errors import CheckpointError
from models.package import PackageBackend
from models.runtime_config import (
    RUNTIME_CONFIG_FILE, check_runtime, cuda_warnings, installed_distributions, missing_system_packages,
    read_runtime_config, unmet_python_requirements,
)

ROOT = Path(__file__).resolve().parents[2]
LIFE = ROOT / "models" / "packages" / "life"
WORDS = ROOT / "models" / "packages" / "words"
UNMET = ROOT / "tests" / "fixtures" / "packages" / "unmet_runtime"


def write_config(tmp_path: Path, text: str) -> Path:
    (tmp_path / RUNTIME_CONFIG_FILE).write_text(text, encoding="utf-8")
    return tmp_path


# --- reading ----------------------------------------------------------------------------------------


def test_a_package_without_the_file_has_no_runtime_config():
    assert read_runtime_config(WORDS) is None
    assert check_runtime(WORDS) is None


def test_the_life_example_asks_for_torch():
    config = read_runtime_config(LIFE)
    assert config.build.python_packages == ("torch==2.13.0",)
    assert config.unknown_keys == []


def test_blank_lists_and_an_unquoted_cuda_version_are_accepted(tmp_path):
    config = read_runtime_config(write_config(tmp_path, "build:\n  cuda_version: 12.1\n  system_packages:\n"
                                                        "  python_packages:\n    - numpy\n"))
    assert config.build.cuda_version == "12.1"
    assert config.build.system_packages == () and config.build.run == ()
    assert read_runtime_config(write_config(tmp_path, "")).build.python_packages == ()


def test_unknown_keys_are_reported_not_fatal(tmp_path):
    config = read_runtime_config(write_config(tmp_path, "build:\n  python_version: '3.11'\nserve: {}\n"))
    assert config.unknown_keys == ["build.python_version", "serve"]


@pytest.mark.parametrize("text, words", [
    ("build: [oops", "is not valid YAML"),
    ("- torch\n", "expected a mapping with a build: section, found list"),
    ("build:\n  python_packages: torch==2.13.0\n", "build.python_packages"),
    ("build:\n  python_packages: [{torch: 2}]\n", "build.python_packages.0"),
    ("build:\n  cuda_version: twelve\n", "'twelve' is not a version"),
    ("build:\n  python_packages: ['--extra-index-url https://x']\n", "is a pip option, not a requirement"),
])
def test_a_malformed_file_stops_start_up_naming_the_key(tmp_path, text, words):
    with pytest.raises(CheckpointError) as caught:
        read_runtime_config(write_config(tmp_path, text))
    assert RUNTIME_CONFIG_FILE in caught.value.message
    assert words in caught.value.message


# --- python_packages --------------------------------------------------------------------------------


def test_requirements_are_matched_by_normalised_name_and_specifier():
    installed = {"torch": "2.13.0+cpu", "pyyaml": "6.0.4", "flask-cors": "5.0.1", "numpy": "2.4.6"}
    unmet, unchecked = unmet_python_requirements((
        "torch==2.13.0",               # a local build label matches a plain == pin (PEP 440)
        "PyYAML>=6",                   # names compare normalised
        "Flask_Cors",
        "numpy<2",                     # mismatched
        "absent-package[extra]>=1",    # missing
        "numpy==1.0; python_version < '3'",  # not for this Python: skipped
        "git+https://example.com/x.git",     # no name before installing: not checkable
    ), installed)
    assert unmet == [("numpy<2", "numpy 2.4.6 is installed"), ("absent-package[extra]>=1", "not installed")]
    assert unchecked == ["git+https://example.com/x.git"]


def test_installed_distributions_are_what_this_python_imports():
    assert installed_distributions()["packaging"] == packaging.__version__


def test_unmet_requirements_stop_start_up_naming_each_and_the_install_command(caplog):
    with caplog.at_level(logging.WARNING, logger="rivulet.package"), pytest.raises(CheckpointError) as caught:
        check_runtime(UNMET)
    message = caught.value.message
    assert "rivulet-no-such-python-package==1.0: not installed" in message
    assert f"packaging<1: packaging {packaging.__version__} is installed" in message
    assert "flask" not in message  # met
    assert f"{sys.executable} -m pip install rivulet-no-such-python-package==1.0 'packaging<1'" in message
    warnings = caplog.text
    assert "unknown keys, ignored: build.python_version" in warnings
    assert "cuda_version 12.1.1 is asked" in warnings


def test_the_package_backend_checks_before_importing_app_py():
    backend = PackageBackend(UNMET, torch.device("cpu"))
    with pytest.raises(CheckpointError) as caught:
        backend.load()
    assert "rivulet-no-such-python-package" in caught.value.message  # not app.py's RuntimeError


def test_the_life_example_passes_its_check():
    assert check_runtime(LIFE).build.python_packages == ("torch==2.13.0",)


# --- system_packages and cuda_version ---------------------------------------------------------------


def test_missing_debian_packages_are_named(tmp_path):
    status = tmp_path / "status"
    status.write_text("Package: libsndfile1\nStatus: install ok installed\nDescription: sound files\n"
                      " Status: a continuation line is not a field\n\n"
                      "Package: ffmpeg\nStatus: deinstall ok config-files\n\n"
                      "Package: git\nStatus: install ok installed\n")
    assert missing_system_packages(("libsndfile1", "ffmpeg", "git=1:2.39", "git:amd64", "curl"), status) == [
        "ffmpeg", "curl"]
    assert missing_system_packages(("git",), tmp_path / "absent") is None  # cannot tell: not checked
    assert missing_system_packages((), tmp_path / "absent") == []


def test_this_systems_dpkg_database_is_read():
    if missing_system_packages(("dpkg",)) is None:
        pytest.skip("not a Debian-based system: no dpkg database")
    assert missing_system_packages(("dpkg", "rivulet-no-such-debian-package")) == ["rivulet-no-such-debian-package"]


def test_the_fixture_warns_about_its_missing_debian_package(caplog):
    if missing_system_packages(("dpkg",)) is None:
        pytest.skip("not a Debian-based system: no dpkg database")
    with caplog.at_level(logging.WARNING, logger="rivulet.package"), pytest.raises(CheckpointError):
        check_runtime(UNMET)
    assert "system packages not installed: rivulet-no-such-debian-package" in caplog.text


@pytest.mark.parametrize("built, available, words", [
    (None, False, "is a CPU build"),
    ("11.8", True, "brings the older CUDA runtime 11.8"),
    ("12.1", False, "no CUDA device is usable"),
    ("12.8", True, None),
    ("12.1", True, None),  # 12.1.1 asked: the runtime's minor version is what counts
])
def test_cuda_version_is_compared_with_torchs_cuda_runtime(monkeypatch, built, available, words):
    monkeypatch.setattr(torch.version, "cuda", built)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    warnings = cuda_warnings("12.1.1")
    if words is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and words in warnings[0]
