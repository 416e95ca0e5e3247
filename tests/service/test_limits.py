"""The open-files limit is lifted so worker_connections streams fit, within the hard limit, never lowered."""
from __future__ import annotations

import resource

import pytest

from service.limits import SPARE_FILES, raise_open_files_limit


@pytest.fixture
def nofile():
    """Restore this process's limit after the test (raising the soft limit within the hard one is harmless)."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield before
    resource.setrlimit(resource.RLIMIT_NOFILE, before)


def test_a_low_soft_limit_is_raised_to_fit_the_connections(nofile):
    _, hard = nofile
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    wanted = 1000 + SPARE_FILES
    expected = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    assert raise_open_files_limit(1000) == (256, expected)
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == (expected, hard)


def test_a_high_soft_limit_is_never_lowered(nofile):
    soft, _ = nofile
    assert raise_open_files_limit(1) == (soft, soft)
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == soft


def test_the_hard_limit_caps_it(nofile):
    _, hard = nofile
    if hard == resource.RLIM_INFINITY or hard < 300:
        pytest.skip("needs a finite hard limit of at least 300")
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    assert raise_open_files_limit(hard * 2) == (256, hard)
