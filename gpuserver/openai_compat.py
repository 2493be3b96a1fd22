"""Helpers shared by the OpenAI-compatible LLM and TTS clients: SSE parsing, readable errors
and the overall wait budget of one request.

Errors shown to users name the service and what went wrong (status, timeout), never the
server's URL or its own words: those go to the log, shortened and escaped (`%r`), so an
upstream's text cannot forge log lines.

The SSE decoder follows the WHATWG event-stream rules that matter for chat completions: lines
end in LF, CRLF or CR (and nothing else: httpx's `aiter_lines()` also splits on U+2028, U+0085
and the like, which JSON may carry unescaped inside a string); `data:` fields of one event are
joined with LF; an empty line ends the event; comment lines (`: ping` keep-alives) and other
fields (`event:`, `id:`, `retry:`) are ignored.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncGenerator, AsyncIterable, AsyncIterator, Awaitable
from typing import TypeVar

import httpx

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_ERROR_CHARS = 300
_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Incremental event-stream decoder: text in arbitrary pieces in, each event's data out."""

    def __init__(self) -> None:
        self._pending = ""  # an unfinished line
        self._data: list[str] = []  # data fields of the event being read
        self._started = False

    def feed(self, text: str) -> list[str]:
        """Take the next piece of the stream; return the data of the events it completed."""
        if not self._started and text:
            self._started = True
            text = text.removeprefix("\ufeff")  # a UTF-8 BOM may open the stream
        text = self._pending + text
        # A trailing CR may be the first half of a CRLF: keep it until the next piece.
        held = "\r" if text.endswith("\r") else ""
        lines = _LINE_END.split(text.removesuffix(held))
        self._pending = lines.pop() + held
        return self._events(lines)

    def close(self) -> list[str]:
        """The end of the stream: an unterminated last event still counts (some servers close
        right after their last `data:` line)."""
        lines = [self._pending.removesuffix("\r")] if self._pending else []
        self._pending = ""
        return self._events([*lines, ""])

    def _events(self, lines: list[str]) -> list[str]:
        events = []
        for line in lines:
            if not line:
                if self._data:
                    events.append("\n".join(self._data))
                    self._data = []
                continue
            field, _, value = line.partition(":")
            if field == "data":
                self._data.append(value.removeprefix(" "))
        return events


async def aiter_sse_data(chunks: AsyncIterable[str]) -> AsyncIterator[str]:
    """The `data` of each event of an event stream, given as decoded text in any pieces."""
    decoder = SSEDecoder()
    async for chunk in chunks:
        for data in decoder.feed(chunk):
            yield data
    for data in decoder.close():
        yield data


def error_detail(body: bytes) -> str:
    """The server's own words from an error response body, shortened for the log.

    Understands OpenAI's `{"error": {"message": ...}}`, `{"error": "..."}` (Ollama),
    `{"detail": ...}` (FastAPI) and `{"message": ...}`; otherwise the body's text.
    """
    text = body.decode("utf-8", errors="replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict):
        error = payload.get("error")
        if isinstance(error, dict) and error.get("message"):
            text = str(error["message"])
        elif isinstance(error, str) and error:
            text = error
        elif payload.get("detail"):
            detail = payload["detail"]
            text = detail if isinstance(detail, str) else json.dumps(detail)
        elif payload.get("message"):
            text = str(payload["message"])
    if len(text) > _MAX_ERROR_CHARS:
        text = text[:_MAX_ERROR_CHARS] + "…"
    return text


def clipped(text: str) -> str:
    """Upstream text shortened for a log line (log it with %r, which escapes it)."""
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + "…"


async def http_error(service: str, response: httpx.Response) -> str | None:
    """A user-facing message for an HTTP error status (its body is logged), else None."""
    if response.status_code < 400:
        return None
    detail = error_detail(await response.aread())
    log.warning(
        "the %s at %s answered HTTP %d: %r",
        service,
        response.request.url,
        response.status_code,
        detail,
    )
    reason = f" {response.reason_phrase}" if response.reason_phrase else ""
    return f"The {service} answered HTTP {response.status_code}{reason}."


def transport_error(service: str, url: str, exc: httpx.HTTPError, timeout_s: float) -> str:
    """A user-facing message for a failed connection, a timeout or a broken stream."""
    log.warning("request to the %s at %s failed: %r", service, url, clipped(repr(exc)))
    if isinstance(exc, httpx.ConnectError):
        return f"Cannot connect to the {service}."
    if isinstance(exc, httpx.TimeoutException):
        return f"The {service} timed out ({type(exc).__name__} after {timeout_s:g} s)."
    if isinstance(exc, httpx.RemoteProtocolError):
        return f"The {service} broke off the response."
    return f"The request to the {service} failed ({type(exc).__name__})."


class WaitBudget:
    """The seconds one request may spend waiting for its server, in all.

    Per-read timeouts miss a server that keeps a stream alive without progress (SSE `:`
    keep-alives, a trickle of bytes); this bounds the total. Only time spent waiting on
    the server counts: while the consumer holds an item (a paced speech pipeline), the
    clock stops. TimeoutError once spent.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._left = seconds

    async def wait(self, awaitable: Awaitable[T]) -> T:
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(max(self._left, 0.0)):
                return await awaitable
        finally:
            self._left -= loop.time() - started

    async def iterate(self, source: AsyncIterator[T]) -> AsyncIterator[T]:
        """`source`'s items, each waited for within the budget; closes `source` at the end."""
        try:
            while True:
                try:
                    item = await self.wait(anext(source))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            if isinstance(source, AsyncGenerator):
                await source.aclose()


def bearer_headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


PROBE_TIMEOUT_S = 3.0


async def probe_models(
    client: httpx.AsyncClient, base_url: str, service: str, model: str | None = None
) -> str | None:
    """Ask `GET {base_url}/models` whether the server is up: None if so, else why not.

    Any answer but a refused key or a server error counts as up (some servers have no
    /models). With `model`, a listing that lacks it is a problem too (a model not pulled).
    """
    url = base_url.rstrip("/") + "/models"
    try:
        response = await client.get(url, timeout=PROBE_TIMEOUT_S)
    except httpx.HTTPError as exc:
        return transport_error(service, url, exc, PROBE_TIMEOUT_S)
    if response.status_code in (401, 403) or response.status_code >= 500:
        return await http_error(service, response)
    if model and response.status_code == 200:
        listed = _model_ids(response)
        # Ollama lists "name:tag" and accepts a bare name for ":latest".
        if listed and model not in listed and f"{model}:latest" not in listed:
            shown = ", ".join(sorted(listed)[:10]) + (", …" if len(listed) > 10 else "")
            return f"The {service} at {base_url} has no model {model!r} (it has: {shown})."
    return None


def _model_ids(response: httpx.Response) -> set[str]:
    try:
        data = response.json().get("data")
    except (ValueError, AttributeError):
        return set()
    if not isinstance(data, list):
        return set()
    return {str(item["id"]) for item in data if isinstance(item, dict) and "id" in item}
