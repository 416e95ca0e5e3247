"""Model packages on the request pipeline: a body becomes a ``PackageRequest``, an output becomes a payload.

``service/jobs.py`` calls these for every package request (``/v1/sse``, ``/v1/infer``, resumable
streams), so a package's requests share the LLM's queue bound, 429, timeout, metrics and cancel on
disconnect. The checking itself lives with the schema (models/package_schema.py): this is the seam.
"""
from __future__ import annotations

from typing import Any

from models.api import PackageOutput, PackageRequest
from models.package import PackageBackend


def build_package_request(backend: PackageBackend, body: Any, request_id: str, deadline: float) -> PackageRequest:
    """Validate ``body`` (KServe-v2 ``inputs`` list, ``{"inputs": {...}}`` or a plain object) against the
    package's INPUT_SCHEMA. Raises InvalidRequest naming the field and the rule (``param`` = the field)."""
    return PackageRequest(request_id, backend.input_schema.parse(body), deadline)


def package_payload(event: PackageOutput) -> dict[str, Any]:
    """One ``send_streamed_output(dict)`` is one event's ``data:``, the package's own dict as it sent it
    (already a JSON-only copy made on the engine thread)."""
    return event.data
