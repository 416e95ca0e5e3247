"""Rivulet's settings: one frozen object, read once from ``RIVULET_*`` environment variables.

Every field ``name`` is set by the variable ``RIVULET_<NAME>``; an unset or empty variable keeps the
default. Lists are comma-separated. ``create_app`` reads them with ``Settings.from_env()``; tests pass
overrides (``Settings.from_env({}, max_batch=2)``) instead of touching ``os.environ``.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

ENV_PREFIX = "RIVULET_"
MiB = 1024 * 1024
DEMO_MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "demo"
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?|mps")
_STORE_URL = re.compile(r"(redis|rediss|unix)://\S+")


class SettingsError(ValueError):
    """An environment variable holds a value Rivulet cannot use. Raised at start-up, names the variable."""


class Settings(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # --- the model and where it runs ---
    # An HF-layout Llama checkpoint directory, or a model package (app.py + input_schema.py).
    model: Path = DEMO_MODEL_DIR
    # cuda = every visible GPU, one gunicorn worker each, worker i on cuda:i (service/devices.py);
    # auto = the same when there is a GPU, else the CPU; cpu, mps, cuda:N = that one device.
    device: str = "auto"
    # Sequences decoded together in one step (also the number of KV-cache rows allocated; fewer when
    # they do not fit in the memory left after the weights, see models/memory.py).
    max_batch: int = Field(32, ge=1)
    # Prompts longer than this are prefilled this many tokens per engine step, beside the running
    # streams' decoding, so a long prompt slows their tokens a little instead of stopping them. 0 = off.
    prefill_chunk_tokens: int = Field(256, ge=0)
    # Tokens (prompt + output) per sequence; unset = the checkpoint's own context. The KV cache holds
    # max_batch x max_context positions, so a long-context model may need it lower to fit in memory.
    max_context: int | None = Field(None, ge=2)
    # Run the decode step through torch.compile (about 2x faster a step for a small model on a CPU),
    # compiled at start-up: tens of seconds more before a worker is ready, and a C++ compiler needed
    # (without one, the step runs eager and the log says why).
    compile: bool = False
    # A prompt that begins with 64 or more of the same tokens as a running request's prompt (a shared
    # system prompt) copies that row's cached keys instead of computing them (models/prefix_cache.py);
    # one identical to a prompt a row still holds is not computed at all (models/row_prompts.py).
    prefix_caching: bool = True
    # On a CPU, a second copy of the projection weights in oneDNN's blocked layout, which batched products
    # multiply 1.2-1.5x faster (models/cpu_weights.py): where the native step serves the decode steps, the
    # prefill of prompts of up to 256 tokens and steps carrying a long prompt's chunk. It costs the weights'
    # memory once more, so it is skipped when they take more than a quarter of the free memory; off here
    # saves that memory always.
    packed_weights: bool = True
    # On a CPU in fp32, C kernels built at start-up by the machine's C compiler (models/native_build.py):
    # a one-row decode step in one call (models/native_step.py) and batched steps' attention over each
    # row's own keys (models/ragged_attention.py). Without a compiler a library built ahead of time is
    # loaded (the Docker image's); without either, or off here, torch runs them.
    native_kernels: bool = True
    # Weight-only quantization: none, or int8 (models/quantize.py): every projection and the LM head as int8
    # rows with a scale each. Where the native CPU step serves, every product reads them (a quarter of
    # fp32's bytes: a step with few streams runs up to ~3x faster) and the fp32 weights are released.
    # Outputs change slightly, as any int8 model's do. Elsewhere only the outputs are the int8 model's.
    quant: Literal["none", "int8"] = "none"
    # On CUDA, replay each plain decode step from a CUDA graph (models/cuda_graphs.py): one launch a step
    # instead of one per kernel, of which a small model's eager step has hundreds. One graph per batch-size
    # bucket is captured at start-up, longer key counts on first use; each KV-cache row holds one spare
    # position for the padding. Anything that fails to capture is logged and runs eager. No effect on a CPU.
    cuda_graphs: bool = True

    # --- who may call, and how much ---
    # Accepted tokens (X-Auth-Token: T or Authorization: Bearer T). Empty = no authentication.
    api_keys: tuple[str, ...] = ()
    # --- signed requests and app authentication (service/auth.py, service/signing.py) ---
    # A file of AK:SK lines ("#" comments): requests signed SDK-HMAC-SHA256 with those pairs.
    access_keys: Path | None = None
    # A file of AppKey:AppSecret lines: app-signed requests (the same algorithm, other keys).
    app_keys: Path | None = None
    # Codes accepted in X-Apig-AppCode (simple app authentication).
    app_codes: tuple[str, ...] = ()
    # How far X-Sdk-Date may be from the server's clock, either way: bounds how long a captured signed
    # request can be replayed.
    signature_max_skew_s: float = Field(900.0, gt=0)
    # Larger request bodies get 413 before they are read (Content-Length) or once they pass it (chunked).
    max_body_bytes: int = Field(12 * MiB, ge=1)
    # The whole request body must arrive within this many seconds of the head, else 408 (a stalled or
    # trickling upload holds its connection no longer). The head itself is bounded by gunicorn's keepalive.
    body_timeout_s: float = Field(60.0, gt=0)
    # A request still running this long after it arrived ends with a timeout error event.
    request_timeout_s: float = Field(40.0, gt=0)
    # Requests queued beyond the running batch; past it, 429 with Retry-After. Every request passes
    # through the queue, so at least 1.
    max_waiting: int = Field(256, ge=1)
    # A stream quiet this long gets an SSE comment (": ping"), which also probes for a gone client.
    heartbeat_s: float = Field(15.0, gt=0)
    # One engine step (a batched forward pass, or a whole infer of a model package) running longer than
    # this means the engine is stuck: the worker ends its streams and restarts. Unset = twice the request
    # timeout plus 10 s (no request may run longer than its timeout; a drained package's infer may run
    # on a little after its client left).
    step_timeout_s: float | None = Field(None, gt=0)

    # --- browsers: CORS and resumable streams (/v1/streams) ---
    # Origins allowed to call the API from a page served elsewhere. Empty = no CORS headers.
    cors_origins: tuple[str, ...] = ()
    # A resumable stream with no reader connected this long is cancelled.
    stream_reader_grace_s: float = Field(30.0, gt=0)
    # A finished resumable stream is kept this long for reconnects, then answers 404.
    stream_retention_s: float = Field(300.0, gt=0)
    # Replay-buffer bounds: events and bytes per stream, bytes for all streams of a worker.
    stream_max_events: int = Field(4096, ge=1)
    stream_max_bytes: int = Field(4 * MiB, ge=1)
    stream_total_bytes: int = Field(256 * MiB, ge=1)
    # Where resumable streams live: empty (or "memory") = this worker's memory, read only through it;
    # redis://host:6379/0 (or rediss://, unix://) = Redis, shared by every replica behind a balancer.
    stream_store: str = ""

    # --- tests ---
    # Enables test-only routes (e.g. forcing a stream's connection to drop). Never in production.
    test_hooks: bool = False

    @field_validator("api_keys", "app_codes", "cors_origins", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(item.strip() for item in value.split(",") if item.strip())
        return value

    @field_validator("stream_store")
    @classmethod
    def _known_store(cls, value: str) -> str:
        value = value.strip()
        if value not in ("", "memory") and not _STORE_URL.match(value):
            raise ValueError("expected memory or a redis://host:port/db (rediss://, unix://) URL")
        return value

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str) -> str:
        if not _DEVICE.fullmatch(value):
            raise ValueError("expected auto, cpu, cuda, cuda:N or mps")
        return value

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.access_keys or self.app_keys or self.app_codes)

    @classmethod
    def env_name(cls, field: str) -> str:
        return ENV_PREFIX + field.upper()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then ``RIVULET_*`` variables of ``environ`` (``os.environ`` if None), then overrides."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in cls.model_fields:
            raw = environ.get(cls.env_name(field), "").strip()
            if raw:
                values[field] = raw
        values.update(overrides)
        try:
            return cls(**values)
        except ValidationError as exc:
            problems = "; ".join(
                f"{cls.env_name(str(err['loc'][0])) if err['loc'] else 'settings'}: {err['msg']}"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid settings: {problems}") from None
