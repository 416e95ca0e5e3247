"""Key files: ``RIVULET_ACCESS_KEYS`` (``AK:SK`` lines) and ``RIVULET_APP_KEYS`` (``AppKey:AppSecret`` lines).

One pair a line, split at the first ``:`` (a secret may contain ``:``); blank lines and lines starting with
``#`` are skipped. A file that others may read, or that anyone but its owner may write, is refused: chmod
600 (or 640/440 for a group, as a Kubernetes Secret mounted with ``defaultMode: 0440`` and an
``fsGroup`` gives). Problems name the setting, the file and the line, never a secret.

The file is read at start-up (a bad one stops the worker) and looked at again at most once a second
while requests come: an edited or replaced file (a Kubernetes Secret update swaps a symlink) takes effect
without a restart. A reload that fails keeps the keys already loaded and logs why.
"""
from __future__ import annotations

import logging
import os
import stat
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from service.settings import SettingsError

log = logging.getLogger("rivulet.auth")

RECHECK_S = 1.0
_FORBIDDEN_MODE = stat.S_IROTH | stat.S_IWOTH | stat.S_IWGRP


def parse_key_lines(text: str, source: str) -> dict[str, str]:
    """``KEY:SECRET`` lines -> {key: secret}; ``source`` names the file in errors."""
    keys: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, colon, secret = line.partition(":")
        key, secret = key.strip(), secret.strip()
        if not colon or not key or not secret:
            raise SettingsError(f"{source}, line {number}: expected KEY:SECRET")
        if key in keys:
            raise SettingsError(f"{source}, line {number}: the key id {key!r} is listed twice")
        keys[key] = secret
    return keys


class KeyFile:
    """The pairs of one key file, reloaded when the file changes."""

    def __init__(self, path: Path, setting: str, *, recheck_s: float = RECHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.setting = setting
        self._recheck_s = recheck_s
        self._clock = clock
        self._next_check = clock() + recheck_s
        self._stamp, self._keys = self._load()  # SettingsError at start-up

    def keys(self) -> Mapping[str, str]:
        now = self._clock()
        if now >= self._next_check:
            self._next_check = now + self._recheck_s
            self._reload_if_changed()
        return self._keys

    def _reload_if_changed(self) -> None:
        try:
            if _stamp(self.path.stat()) == self._stamp:
                return
            self._stamp, self._keys = self._load()
        except (OSError, SettingsError) as exc:
            # Keep serving with the keys we have; report each new state of the file once.
            self._stamp = _stamp_or_none(self.path)
            log.error("%s: not reloaded, the %d keys loaded before stay in use: %s",
                      self.setting, len(self._keys), exc)
            return
        log.info("%s: reloaded %s (%d keys)", self.setting, self.path, len(self._keys))

    def _load(self) -> tuple[tuple[int, ...], dict[str, str]]:
        source = f"{self.setting} ({self.path})"
        try:
            with open(self.path, encoding="utf-8") as file:
                info = os.fstat(file.fileno())
                check_mode(info.st_mode, source)
                keys = parse_key_lines(file.read(), source)
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"{source}: cannot read the key file: {exc}") from None
        if not keys:
            log.warning("%s holds no keys: every request signed with one of its keys is refused", source)
        return _stamp(info), keys


def check_mode(mode: int, source: str) -> None:
    if mode & _FORBIDDEN_MODE:
        raise SettingsError(
            f"{source}: the key file has mode {stat.S_IMODE(mode):04o}; others must not read it and only its "
            "owner may write it (chmod 600, or 640 / 440 to share it with a group)")


def _stamp(info: os.stat_result) -> tuple[int, ...]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


def _stamp_or_none(path: Path) -> tuple[int, ...]:
    try:
        return _stamp(path.stat())
    except OSError:
        return ()
