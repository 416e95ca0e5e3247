"""Key files: the AK:SK format, the mode check, and reloading a changed file."""
from __future__ import annotations

import logging
import os

import pytest

from service.key_files import KeyFile, parse_key_lines
from service.settings import SettingsError


def write_keys(path, text: str, mode: int = 0o600):
    path.write_text(text)
    os.chmod(path, mode)
    return path


def test_pairs_comments_and_blank_lines():
    text = "# production\nAK1:SK1\n\n  AK2 : s:k:2  \n#AK3:SK3\n"
    assert parse_key_lines(text, "f") == {"AK1": "SK1", "AK2": "s:k:2"}


@pytest.mark.parametrize("text, problem", [
    ("AK1:SK1\njust-a-secret-value\n", "line 2: expected KEY:SECRET"),
    (":lonely-secret-value\n", "line 1: expected KEY:SECRET"),
    ("AK1:\n", "line 1: expected KEY:SECRET"),
    ("AK1:secret-one\nAK1:secret-two\n", "line 2: the key id 'AK1' is listed twice"),
])
def test_bad_lines_name_the_line_not_the_secret(text, problem):
    with pytest.raises(SettingsError, match=problem) as raised:
        parse_key_lines(text, "RIVULET_ACCESS_KEYS (keys)")
    assert "secret" not in str(raised.value).replace("SECRET", "")


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o640, 0o440])
def test_owner_or_group_readable_files_are_accepted(tmp_path, mode):
    path = write_keys(tmp_path / "keys", "AK:SK\n", mode)
    assert dict(KeyFile(path, "RIVULET_ACCESS_KEYS").keys()) == {"AK": "SK"}


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o620, 0o602, 0o666])
def test_files_others_may_read_or_anyone_else_may_write_are_refused(tmp_path, mode):
    path = write_keys(tmp_path / "keys", "AK:SK\n", mode)
    with pytest.raises(SettingsError, match=rf"RIVULET_APP_KEYS \({path}\): the key file has mode 0{mode:o}"):
        KeyFile(path, "RIVULET_APP_KEYS")


def test_a_missing_file_is_a_settings_error(tmp_path):
    with pytest.raises(SettingsError, match="RIVULET_ACCESS_KEYS .*cannot read the key file"):
        KeyFile(tmp_path / "absent", "RIVULET_ACCESS_KEYS")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_changed_file_is_reloaded_after_the_recheck_interval(tmp_path):
    clock = Clock()
    path = write_keys(tmp_path / "keys", "AK1:SK1\n")
    keys = KeyFile(path, "RIVULET_ACCESS_KEYS", recheck_s=1.0, clock=clock)
    replacement = write_keys(tmp_path / "keys.new", "AK2:SK2\n")
    os.replace(replacement, path)  # as a Kubernetes Secret update swaps its files
    assert dict(keys.keys()) == {"AK1": "SK1"}  # not looked at again yet
    clock.now += 1.0
    assert dict(keys.keys()) == {"AK2": "SK2"}


def test_a_broken_reload_keeps_the_old_keys_and_says_why(tmp_path, caplog):
    clock = Clock()
    path = write_keys(tmp_path / "keys", "AK1:SK1\n")
    keys = KeyFile(path, "RIVULET_ACCESS_KEYS", recheck_s=1.0, clock=clock)
    write_keys(path, "AK1:SK1\nnot-a-pair-secretish\n")
    clock.now += 1.0
    with caplog.at_level(logging.ERROR, logger="rivulet.auth"):
        assert dict(keys.keys()) == {"AK1": "SK1"}
        clock.now += 1.0
        keys.keys()  # the same broken file is reported once
    assert [r.getMessage().count("line 2: expected KEY:SECRET") for r in caplog.records] == [1]
    assert "not-a-pair-secretish" not in caplog.text
    write_keys(path, "AK1:SK1\nAK2:SK2\n")
    clock.now += 1.0
    assert set(keys.keys()) == {"AK1", "AK2"}
