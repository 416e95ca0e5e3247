"""The replay buffer in Redis, shared by every replica (``RIVULET_STREAM_STORE=redis://host:6379/0``).

Same contract as ``MemoryStreamStore`` (ids, bounds, the dropped-events gap, 404 after delete or
expiry), so a stream started on one replica can be read, resumed and cancelled through any other.
Per stream, two keys (the id in braces is a Redis hash tag: both keys of a stream share a slot):

- ``<prefix>:{id}:events``, a Redis Stream. Event n is entry ``n-0``: ``XRANGE (n-0 +`` replays what
  follows event n, ``XREAD BLOCK`` on ``n-0`` tails it. Fields: ``d`` (data), ``n`` (event name, if any).
- ``<prefix>:{id}:meta``, a hash: ``last_id``, ``dropped_through``, ``finished``, ``read_at`` (the last
  reader activity, Redis server time in ms, so replicas with skewed clocks agree).

And three keys for all streams: ``<prefix>:index`` (a sorted set: stream id -> when it expires, ms),
``<prefix>:bytes`` (a hash: stream id -> bytes kept) and ``<prefix>:total`` (their sum).

Every key has a TTL: a finished stream's keys vanish ``retention_s`` after its last event, as in
memory. A running stream holds a lease instead (``RUNNING_LEASE_S``, or the retention time if shorter),
renewed by each append and by ``keep`` (the replica running its work calls it every sweep): the streams
of a replica that died expire within the lease, and their readers learn it then. ``expire``
reaps the index entries (and the byte counts) of streams whose time has come.

Every change is one Lua script, so the bounds, ids and counters never see a half-done step, whichever
replica makes it. A delete leaves a tombstone entry in the events key for a short while: a reader
blocked in ``XREAD`` on another replica wakes up at once (a plain ``DEL`` does not wake it).

Redis unreachable: every method raises ``StoreUnavailable`` (503 before a stream starts). redis-py's
sockets are the standard library's, which gunicorn's gevent worker has patched: a blocked ``XREAD``
holds one connection and its greenlet, never the worker.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from service.stream_store import Slice, StoreBounds, StoredEvent, StoreFull, StoreUnavailable, StreamGone

# One wait blocks in Redis at most this long (the caller loops); the socket timeout stays above it.
MAX_BLOCK_S = 5.0
SOCKET_TIMEOUT_S = MAX_BLOCK_S + 5.0
CONNECT_TIMEOUT_S = 1.0  # Redis down is told fast: POST /v1/streams answers 503, /ready says so
# /ready's probe has its own client, quick to give up: a readiness probe has a second or so to answer.
PING_TIMEOUT_S = 0.5
# A running stream's keys live this long past the last sign of the replica that runs it (a sweep every
# second renews it): long enough for any pause of that replica, short enough for its readers to learn
# soon that it died.
RUNNING_LEASE_S = 30.0
TOMBSTONE_TTL_MS = int(2 * MAX_BLOCK_S * 1000)  # long enough for every blocked reader to wake on it

# Shared head of the scripts: the keys, and the server's clock in ms.
_PRELUDE = """
local meta, events, index, bytes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# Renew the TTL of a stream's keys (ttl) and of the shared ones (the retention time, the longest TTL a
# stream may get: the shared keys never vanish before a stream's).
_RENEW = """
local function renew(meta, events, id, ttl, retention)
  redis.call('PEXPIRE', meta, ttl)
  redis.call('PEXPIRE', events, ttl)
  redis.call('ZADD', index, now + ttl, id)
  redis.call('PEXPIRE', index, retention)
  redis.call('PEXPIRE', bytes, retention)
  redis.call('PEXPIRE', total, retention)
end
"""

# Forget a stream's keys and its share of the total.
_FORGET = """
local function forget(meta, events, id)
  local size = tonumber(redis.call('HGET', bytes, id) or '0')
  redis.call('HDEL', bytes, id)
  redis.call('ZREM', index, id)
  if size ~= 0 then redis.call('DECRBY', total, size) end
  redis.call('DEL', meta, events)
end
"""

# ARGV: id, total_bytes, lease_ms, retention_ms. -> 1 created, 0 full, -1 exists.
_CREATE = _PRELUDE + _RENEW + """
if tonumber(redis.call('GET', total) or '0') >= tonumber(ARGV[2]) then return 0 end
if redis.call('EXISTS', meta) == 1 then return -1 end
redis.call('HSET', meta, 'last_id', 0, 'dropped_through', 0, 'finished', 0, 'read_at', now)
redis.call('HSET', bytes, ARGV[1], 0)
redis.call('INCRBY', total, 0)
renew(meta, events, ARGV[1], tonumber(ARGV[3]), tonumber(ARGV[4]))
return 1
"""

# ARGV: id, data, name ('' = none), finish (0/1), max_events, max_bytes, total_bytes, lease_ms,
# retention_ms. A finished stream's keys live for the retention time, a running one's for the lease.
# -> the new event's id; -1 gone; -2 already finished.
_APPEND = _PRELUDE + _RENEW + """
if redis.call('EXISTS', meta) == 0 then return -1 end
if redis.call('HGET', meta, 'finished') == '1' then return -2 end
local id, data = ARGV[1], ARGV[2]
local max_events, max_bytes, total_bound = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local last = redis.call('HINCRBY', meta, 'last_id', 1)
if ARGV[3] == '' then
  redis.call('XADD', events, last .. '-0', 'd', data)
else
  redis.call('XADD', events, last .. '-0', 'd', data, 'n', ARGV[3])
end
local kept_bytes = redis.call('HINCRBY', bytes, id, #data)
local all_bytes = redis.call('INCRBY', total, #data)
-- Shed the oldest events past the bounds; the newest always stays (its reader may not have it yet).
local kept = redis.call('XLEN', events)
while kept > 1 and (kept > max_events or kept_bytes > max_bytes or all_bytes > total_bound) do
  local oldest = redis.call('XRANGE', events, '-', '+', 'COUNT', 1)[1]
  local fields, size = oldest[2], 0
  for i = 1, #fields, 2 do
    if fields[i] == 'd' then size = #fields[i + 1] end
  end
  redis.call('XDEL', events, oldest[1])
  redis.call('HSET', meta, 'dropped_through', string.match(oldest[1], '^(%d+)'))
  kept_bytes = redis.call('HINCRBY', bytes, id, -size)
  all_bytes = redis.call('INCRBY', total, -size)
  kept = kept - 1
end
local ttl = tonumber(ARGV[8])
if ARGV[4] == '1' then
  redis.call('HSET', meta, 'finished', 1)
  ttl = tonumber(ARGV[9])
end
renew(meta, events, id, ttl, tonumber(ARGV[9]))
return last
"""

# ARGV: after. -> {last_id, finished, dropped_through, entries} or -1 (gone). Counts as reader activity.
_READ = _PRELUDE + """
if redis.call('EXISTS', meta) == 0 then return -1 end
redis.call('HSET', meta, 'read_at', now)
local m = redis.call('HMGET', meta, 'last_id', 'finished', 'dropped_through')
return {tonumber(m[1]), tonumber(m[2]), tonumber(m[3]), redis.call('XRANGE', events, '(' .. ARGV[1] .. '-0', '+')}
"""

# ARGV: after. -> 1 something to read (newer event, or finished), 0 wait, -1 gone. Reader activity.
_TOUCH = _PRELUDE + """
if redis.call('EXISTS', meta) == 0 then return -1 end
redis.call('HSET', meta, 'read_at', now)
local m = redis.call('HMGET', meta, 'last_id', 'finished')
if tonumber(m[1]) > tonumber(ARGV[1]) or m[2] == '1' then return 1 end
return 0
"""

# -> ms since the last reader activity, or -1 (gone).
_IDLE = _PRELUDE + """
local read_at = redis.call('HGET', meta, 'read_at')
if not read_at then return -1 end
return now - tonumber(read_at)
"""

# ARGV: id. -> 1 deleted, 0 was not there. Leaves a tombstone entry after the last event.
_DELETE = _PRELUDE + _FORGET + """
if redis.call('EXISTS', meta) == 0 then return 0 end
local last = tonumber(redis.call('HGET', meta, 'last_id'))
forget(meta, events, ARGV[1])
redis.call('XADD', events, (last + 1) .. '-0', 'gone', 1)
redis.call('PEXPIRE', events, tonumber(ARGV[2]))
return 1
"""

# ARGV: key prefix. -> the ids whose expiry time has passed (their keys are gone or go now).
_EXPIRE = _PRELUDE + _FORGET + """
local old = redis.call('ZRANGEBYSCORE', index, '-inf', now)
for _, id in ipairs(old) do
  forget(ARGV[1] .. ':{' .. id .. '}:meta', ARGV[1] .. ':{' .. id .. '}:events', id)
end
return old
"""

# ARGV: lease_ms, retention_ms, ids... KEYS[6..]: meta, events of each. Renew the lease of running
# streams whose work this replica runs.
_KEEP = _PRELUDE + _RENEW + """
local lease, retention = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = 3, #ARGV do
  local m, e = KEYS[2 * i], KEYS[2 * i + 1]
  if redis.call('HGET', m, 'finished') == '0' then renew(m, e, ARGV[i], lease, retention) end
end
return 0
"""


class RedisStreamStore:
    """Streams in Redis; see the module's docstring. Safe to share between greenlets of one worker."""

    backend = "redis"

    def __init__(self, url: str, bounds: StoreBounds, *, prefix: str = "rivulet:stream") -> None:
        self.bounds = bounds
        self.url = url
        self._prefix = prefix
        self._retention_ms = max(1, int(bounds.retention_s * 1000))
        self._lease_ms = min(self._retention_ms, int(RUNNING_LEASE_S * 1000))
        self._redis = redis.Redis.from_url(
            url, decode_responses=True, socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=CONNECT_TIMEOUT_S, health_check_interval=30,
            # One retry covers a pooled connection that Redis closed (a restart); more would only make a
            # client wait longer for its 503 while Redis is down.
            retry=Retry(NoBackoff(), 1),
        )
        self._probe = redis.Redis.from_url(url, socket_timeout=PING_TIMEOUT_S,
                                           socket_connect_timeout=PING_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
        scripts = {"create": _CREATE, "append": _APPEND, "read": _READ, "touch": _TOUCH, "idle": _IDLE,
                   "delete": _DELETE, "expire": _EXPIRE, "keep": _KEEP}
        self._scripts = {name: self._redis.register_script(text) for name, text in scripts.items()}

    # --- keys ---------------------------------------------------------------------------------

    def _keys(self, stream_id: str) -> list[str]:
        base = f"{self._prefix}:{{{stream_id}}}"
        return [f"{base}:meta", f"{base}:events", f"{self._prefix}:index", f"{self._prefix}:bytes",
                f"{self._prefix}:total"]

    def _run(self, script: str, stream_id: str, *args: Any, keys: Iterable[str] = ()) -> Any:
        with _reachable(self.url):
            return self._scripts[script](keys=[*self._keys(stream_id), *keys], args=list(args))

    # --- the StreamStore protocol -------------------------------------------------------------

    def __len__(self) -> int:
        with _reachable(self.url):
            return int(self._redis.zcard(f"{self._prefix}:index"))

    def total_bytes(self) -> int:
        with _reachable(self.url):
            return int(self._redis.get(f"{self._prefix}:total") or 0)

    def ping(self) -> None:
        with _reachable(self.url):
            self._probe.ping()

    def create(self, stream_id: str) -> None:
        self.expire()
        created = self._run("create", stream_id, stream_id, self.bounds.total_bytes, self._lease_ms,
                            self._retention_ms)
        if created == 0:
            raise StoreFull(
                f"the stream replay buffers are full ({self.bounds.total_bytes} bytes, "
                "RIVULET_STREAM_TOTAL_BYTES); retry when older streams have expired",
                retry_after_s=max(1, int(self.bounds.retention_s)),
            )
        if created == -1:
            raise ValueError(f"stream {stream_id!r} exists")

    def append(self, stream_id: str, data: str, name: str | None = None) -> int:
        return self._append(stream_id, data, name, finish=False)

    def finish(self, stream_id: str, data: str, name: str | None = None) -> int:
        return self._append(stream_id, data, name, finish=True)

    def _append(self, stream_id: str, data: str, name: str | None, *, finish: bool) -> int:
        b = self.bounds
        event_id = int(self._run("append", stream_id, stream_id, data, name or "", int(finish),
                                 b.max_events, b.max_bytes, b.total_bytes, self._lease_ms, self._retention_ms))
        if event_id == -1:
            raise StreamGone(f"no stream {stream_id!r}: unknown, expired or deleted")
        if event_id == -2:
            raise ValueError(f"stream {stream_id!r} is finished")
        return event_id

    def read(self, stream_id: str, after: int) -> Slice:
        found = self._run("read", stream_id, after)
        if found == -1:
            raise StreamGone(f"no stream {stream_id!r}: unknown, expired or deleted")
        last_id, finished, dropped_through, entries = found
        dropped = (after + 1, dropped_through) if after < dropped_through else None
        return Slice(tuple(_events(entries)), last_id, finished == 1, dropped)

    def wait(self, stream_id: str, after: int, timeout: float) -> bool:
        state = self._run("touch", stream_id, after)
        if state == -1:
            raise StreamGone(f"no stream {stream_id!r}: unknown, expired or deleted")
        if state == 1:
            return True
        if timeout <= 0:
            return False
        block_ms = max(1, int(min(timeout, MAX_BLOCK_S) * 1000))
        events_key = self._keys(stream_id)[1]
        # The touch above refreshed the reader's presence; the block is shorter than the grace time's
        # slice the caller asked for, and the caller's next read refreshes it again.
        with _reachable(self.url):
            return bool(self._redis.xread({events_key: f"{after}-0"}, count=1, block=block_ms))

    def idle_s(self, stream_id: str) -> float:
        idle_ms = self._run("idle", stream_id)
        if idle_ms == -1:
            raise StreamGone(f"no stream {stream_id!r}: unknown, expired or deleted")
        return max(0, idle_ms) / 1000

    def delete(self, stream_id: str) -> bool:
        return self._run("delete", stream_id, stream_id, TOMBSTONE_TTL_MS) == 1

    def expire(self) -> list[str]:
        return list(self._run("expire", "", self._prefix))

    def keep(self, stream_ids: Iterable[str]) -> None:
        ids = list(stream_ids)
        if not ids:
            return
        per_stream = [key for sid in ids for key in self._keys(sid)[:2]]
        self._run("keep", "", self._lease_ms, self._retention_ms, *ids, keys=per_stream)

    def close(self) -> None:
        self._redis.close()
        self._probe.close()


def _events(entries: list[Any]) -> Iterator[StoredEvent]:
    for entry_id, fields in entries:
        values = dict(zip(fields[::2], fields[1::2]))
        yield StoredEvent(int(entry_id.split("-", 1)[0]), values["d"], values.get("n"))


@contextmanager
def _reachable(url: str) -> Iterator[None]:
    """Turn Redis being down (or too slow) into the typed 503; a script bug stays a bug."""
    try:
        yield
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        raise StoreUnavailable(
            f"the stream store (Redis at {_without_password(url)}) is unreachable: {exc}; resumable "
            "streams are unavailable until it is back (direct streams are not affected)"
        ) from exc


def _without_password(url: str) -> str:
    """The URL for messages: a password in it (redis://:secret@host) is not for clients' eyes."""
    scheme, sep, rest = url.partition("://")
    if "@" in rest:
        rest = rest.split("@", 1)[1]
    return f"{scheme}{sep}{rest}"
