"""Building the native CPU kernels (models/native_build.py): once per source and CPU where there is a
compiler; ahead of time for every x86-64 level (the Docker image's build), the best one this CPU runs
chosen where there is none; and nothing, logged, where there is neither."""
from __future__ import annotations

import logging
import platform
import shutil
import subprocess
import sys

import pytest

from models import native_build

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler to build the kernels")

V3_CPU = native_build.X86_LEVELS["x86-64-v2"] | native_build.X86_LEVELS["x86-64-v3"]


@pytest.fixture
def fresh(monkeypatch):
    """``load`` as in a new process: nothing loaded or failed yet."""
    monkeypatch.setattr(native_build, "_library", None)
    monkeypatch.setattr(native_build, "load_error", None)


def test_the_library_is_built_once_per_source_and_cpu(tmp_path):
    first = native_build.build(tmp_path)
    built_at = first.stat().st_mtime_ns
    assert native_build.build(tmp_path) == first
    assert first.stat().st_mtime_ns == built_at
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no partial file left behind


def test_a_failing_compiler_is_an_error_not_a_library(tmp_path, monkeypatch):
    monkeypatch.setenv("CC", "false")
    with pytest.raises(subprocess.SubprocessError):
        native_build.build(tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels")
def test_the_image_build_makes_one_library_per_level_named_by_the_source(tmp_path):
    done = subprocess.run([sys.executable, "-m", "models.native_build", "--prebuild", str(tmp_path)],
                          cwd=native_build.SOURCE.parent.parent, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    key = native_build.source_key()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"native_kernels-{key}-{level}.so" for level in native_build.X86_LEVELS)


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels")
def test_the_best_level_this_cpu_runs_is_chosen(tmp_path):
    key = native_build.source_key()
    for level in native_build.X86_LEVELS:
        (tmp_path / f"native_kernels-{key}-{level}.so").touch()
    (tmp_path / "native_kernels-0000000000000000-x86-64-v4.so").touch()  # another source's
    choose = native_build.prebuilt_for_this_cpu
    assert choose(tmp_path, V3_CPU).name.endswith("-x86-64-v3.so")
    assert choose(tmp_path, V3_CPU | native_build.X86_LEVELS["x86-64-v4"]).name == f"native_kernels-{key}-x86-64-v4.so"
    # AVX-512 without AVX2 is no v4 machine: each level needs the ones below it.
    assert choose(tmp_path, native_build.X86_LEVELS["x86-64-v2"] | native_build.X86_LEVELS["x86-64-v4"]).name \
        .endswith("-x86-64-v2.so")
    assert choose(tmp_path, {"sse2"}) is None
    (tmp_path / f"native_kernels-{key}-x86-64-v3.so").unlink()
    assert choose(tmp_path, V3_CPU).name.endswith("-x86-64-v2.so")


@pytest.mark.skipif(platform.machine() != "x86_64", reason="x86-64 levels")
def test_without_a_compiler_a_library_built_ahead_of_time_is_loaded(tmp_path, monkeypatch, fresh, caplog):
    native_build.prebuild(tmp_path / "prebuilt")
    caplog.set_level(logging.INFO, logger="rivulet.engine")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    library = native_build.load(cache_dir=tmp_path / "cache", prebuilt=tmp_path / "prebuilt")
    assert library is not None and native_build.load_error is None
    assert str(tmp_path / "prebuilt") in library._name and "native CPU kernels:" in caplog.text
    assert hasattr(library, "decode_one") and hasattr(library, "ragged_decode_attention")


def test_with_neither_nothing_is_loaded_and_the_log_says_why(tmp_path, monkeypatch, fresh, caplog):
    monkeypatch.setenv("CC", "/nonexistent/cc")
    assert native_build.load(cache_dir=tmp_path / "cache", prebuilt=tmp_path / "none") is None
    assert native_build.load_error.startswith("FileNotFoundError")
    assert "native CPU kernels unavailable" in caplog.text
    assert native_build.load() is None  # decided once per process


def test_a_cache_directory_others_can_write_or_a_link_is_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone could plant a library there
    with pytest.raises(RuntimeError, match="only this user"):
        native_build.build(shared)
    (tmp_path / "link").symlink_to(native_build.build(tmp_path / "own").parent)
    with pytest.raises(RuntimeError, match="only this user"):
        native_build.build(tmp_path / "link")
    assert (tmp_path / "new").exists() is False
    native_build.build(tmp_path / "new")
    assert (tmp_path / "new").stat().st_mode & 0o777 == 0o700
