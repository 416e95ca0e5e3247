"""Requests signed by Huawei Cloud's own SDK (``huaweicloudsdkcore``'s ``SDK-HMAC-SHA256`` signer): the
independent client the verifier is tested against, so the tests do not check our signer against itself."""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from huaweicloudsdkcore.auth.credentials import BasicCredentials
from huaweicloudsdkcore.sdk_request import SdkRequest
from huaweicloudsdkcore.signer.signer import Signer

DATE_FORMAT = "%Y%m%dT%H%M%SZ"


def sdk_date(offset_s: float = 0) -> str:
    return (datetime.now(timezone.utc) + timedelta(seconds=offset_s)).strftime(DATE_FORMAT)


@dataclass
class Signed:
    """A signed request, ready to send: ``target`` is the path and query as they go on the wire."""

    method: str
    target: str
    headers: dict[str, str]
    body: bytes

    def send(self, base_url: str, **kwargs):
        import requests

        return requests.request(self.method, base_url + self.target, headers=self.headers, data=self.body,
                                **kwargs)


def vendor_sign(ak: str, sk: str, method: str, path: str, *, host: str, body: bytes = b"",
                query: list[tuple[str, str]] | None = None, headers: dict[str, str] | None = None,
                date: str | None = None) -> Signed:
    """Sign with the vendor SDK. ``path`` is sent as given (percent-encode it yourself); ``date`` defaults
    to now (passed explicitly, so the SDK never calls its deprecated ``utcnow``)."""
    header_params = {"Content-Type": "application/json", **(headers or {}), "X-Sdk-Date": date or sdk_date()}
    request = SdkRequest(method=method, schema="http", host=host, resource_path=path,
                         query_params=list(query or []), header_params=header_params, body=body)
    Signer(BasicCredentials(ak, sk)).sign(request)
    # The SDK leaves header values as latin-1 text of their UTF-8 bytes, as HTTP libraries send them.
    return Signed(method, request.uri, dict(request.header_params), request.body or b"")
