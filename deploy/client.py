"""A small client for the SparseBERT (or stock deepsparse.server) text classification route.

    from sparsebert.deploy.client import SparseBertClient
    SparseBertClient("http://127.0.0.1:5543", "sst2").classify("A gripping film.")  # one text
    client = SparseBertClient("http://127.0.0.1:5543", "mrpc")
    client.classify([["A man is playing a guitar.", "Someone plays."]])   # one sentence pair

Standard library only. Proxies from the environment are ignored on purpose: the server is
local, and an ``http_proxy`` setting must not send requests (and texts) elsewhere. Bodies are
UTF-8 JSON: \\u-escaping would double or triple the size of non-Latin text against the body limit.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Union

Sequences = Union[str, list[str], list[list[str]]]


class ClientError(Exception):
    """The server refused the request (``status`` 4xx/5xx) or could not be reached (None)."""

    def __init__(self, status: int | None, message: str, url: str):
        super().__init__(f"HTTP {status} from {url}: {message}" if status else f"{url}: {message}")
        self.status, self.message, self.url = status, message, url


@dataclass
class Predictions:
    labels: list[str]
    scores: list[float]


class SparseBertClient:
    def __init__(self, url: str = "http://127.0.0.1:5543", model: str = "sparsebert", timeout: float = 30.0):
        self.url, self.model, self.timeout = url.rstrip("/"), model, timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def infer_url(self) -> str:
        return f"{self.url}/v2/models/{self.model}/infer"

    def classify(self, sequences: Sequences) -> Predictions:
        """Labels and scores, one per text (or pair), in input order. A pair model answers single
        texts with HTTP 422, and a single-text model pairs (ClientError)."""
        answer = self._request(self.infer_url, {"sequences": sequences})
        return Predictions(labels=answer["labels"], scores=answer["scores"])

    def ready(self) -> bool:
        """True when the model answers its ready route; False while loading or unreachable."""
        try:
            self._request(f"{self.url}/v2/models/{self.model}/ready")
            return True
        except ClientError:
            return False

    def _request(self, url: str, payload: dict | None = None) -> dict:
        data = None if payload is None else _json_body(payload)
        request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as error:
            raise ClientError(error.code, _error_message(error.read()), url) from None
        except (urllib.error.URLError, OSError) as error:
            raise ClientError(None, f"cannot reach the server ({getattr(error, 'reason', error)})", url) from None


def _json_body(payload: dict) -> bytes:
    """UTF-8 JSON; a lone surrogate (no UTF-8 for it) is sent escaped instead, as JSON allows."""
    try:
        return json.dumps(payload, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(payload).encode()


def _error_message(body: bytes) -> str:
    """The ``{"error": ...}`` message; the ``{"detail": ...}`` of stock servers; else the text."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode(errors="replace").strip() or "(empty body)"
    if isinstance(parsed, dict):
        return str(parsed.get("error", parsed.get("detail", parsed)))
    return str(parsed)
