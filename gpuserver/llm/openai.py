"""The `openai` LLM: any OpenAI-compatible `POST {base_url}/chat/completions` with streaming.

Works with OpenAI, vLLM, llama.cpp's server, Ollama (`/v1`), LM Studio and the like. The answer
is read as server-sent events; a stream counts as complete when it ends with `data: [DONE]` or
after a choice reported its `finish_reason` (some servers close without [DONE]). Cancelling the
iteration closes the HTTP response, so the server sees the client go and can stop generating.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import aclosing
from typing import Any

import httpx

from gpuserver.llm.base import ChatMessage, LLMBackend, LLMError
from gpuserver.openai_compat import (
    WaitBudget,
    aiter_sse_data,
    bearer_headers,
    clipped,
    http_error,
    probe_models,
    transport_error,
)

log = logging.getLogger(__name__)

_SERVICE = "LLM server"
_DONE = "[DONE]"


class OpenAILLM(LLMBackend):
    """Streams chat completions from an OpenAI-compatible server over one shared HTTP client.

    `timeout_s` bounds connecting and every wait for the next piece of the answer;
    `total_timeout_s` bounds all the waiting for one answer (keep-alives are no progress).
    `api_key`, when given, is sent as a Bearer token.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        temperature: float = 0.7,
        max_tokens: int = 256,
        timeout_s: float = 60.0,
        total_timeout_s: float = 120.0,
    ) -> None:
        self._base_url = base_url
        self._url = base_url.rstrip("/") + "/chat/completions"
        self._model = model
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._timeout_s = timeout_s
        self._total_timeout_s = total_timeout_s
        self._client = httpx.AsyncClient(
            headers=bearer_headers(api_key), timeout=httpx.Timeout(timeout_s)
        )
        if not model:
            log.warning("no LLM model name configured; servers that need one will refuse")

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        key: str = "",
        on_queued: Callable[[int], None] | None = None,
    ) -> AsyncIterator[str]:
        body = {
            "model": self._model,
            "messages": [message.model_dump() for message in messages],
            "stream": True,
            "temperature": self._temperature,
            "max_tokens": self._max_tokens,
        }
        log.debug("chat completion from %s (%d messages)", self._url, len(messages))
        budget = WaitBudget(self._total_timeout_s)
        request = self._client.build_request("POST", self._url, json=body)
        try:
            response = await budget.wait(self._client.send(request, stream=True))
            try:
                if (error := await budget.wait(http_error(_SERVICE, response))) is not None:
                    raise LLMError(error)
                async with aclosing(budget.iterate(_deltas(response))) as deltas:
                    async for delta in deltas:
                        yield delta
            finally:
                await response.aclose()
        except httpx.HTTPError as exc:
            raise LLMError(transport_error(_SERVICE, self._url, exc, self._timeout_s)) from exc
        except TimeoutError:
            log.warning("the %s at %s ran past llm.total_timeout_s", _SERVICE, self._url)
            raise LLMError(
                f"The {_SERVICE} did not finish the answer within {budget.seconds:g} s."
            ) from None

    async def probe(self) -> str | None:
        return await probe_models(self._client, self._base_url, _SERVICE, self._model)

    async def aclose(self) -> None:
        await self._client.aclose()


async def _deltas(response: httpx.Response) -> AsyncIterator[str]:
    """The content deltas of a streamed chat completion, checking that it ended properly."""
    finished = False
    async for data in aiter_sse_data(response.aiter_text()):
        if data.strip() == _DONE:
            return
        choice = _first_choice(_parse_chunk(data))
        if choice is None:
            continue  # e.g. a usage-only chunk
        # The first chunk often carries only the role; content may be null or absent.
        content = (choice.get("delta") or {}).get("content")
        if isinstance(content, str) and content:
            yield content
        finished = finished or bool(choice.get("finish_reason"))
    if not finished:
        raise LLMError(f"The {_SERVICE} ended the answer before it was complete.")


def _parse_chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError:
        chunk = None
    if not isinstance(chunk, dict):
        log.warning("the %s sent an invalid stream chunk: %r", _SERVICE, clipped(data))
        raise LLMError(f"The {_SERVICE} sent an invalid stream chunk.")
    if (error := chunk.get("error")) is not None:
        # Some servers report failures inside the stream, after a 200 status.
        message = error.get("message") if isinstance(error, dict) else error
        log.warning("the %s reported an error: %r", _SERVICE, clipped(str(message)))
        raise LLMError(f"The {_SERVICE} reported an error in the middle of the answer.")
    return chunk


def _first_choice(chunk: dict[str, Any]) -> dict[str, Any] | None:
    choices = chunk.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]
