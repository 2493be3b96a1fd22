"""The `openai` ASR: any OpenAI-compatible `POST {base_url}/audio/transcriptions`.

Works with OpenAI, speaches (faster-whisper), whisper.cpp's server, vLLM and the like. The
utterance goes up as a 16 kHz mono 16-bit WAV file in a multipart form; the answer is the
JSON `{"text": ...}` (a plain-text body is accepted too, as some servers send one).

User-facing errors name the failure, never the server's address: that goes to the log only.
"""

from __future__ import annotations

import io
import logging
import wave

import httpx
import numpy as np

from gpuserver.asr.base import ASRBackend, ASRError
from gpuserver.media import PCM_DTYPE, SAMPLE_RATE
from gpuserver.openai_compat import bearer_headers, http_error

log = logging.getLogger(__name__)

_SERVICE = "speech recognition server"


def wav_bytes(pcm: np.ndarray, sample_rate: int = SAMPLE_RATE) -> bytes:
    """`pcm` (mono int16) as a complete WAV file."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as wav:
        wav.setnchannels(1)
        wav.setsampwidth(2)
        wav.setframerate(sample_rate)
        wav.writeframes(np.ascontiguousarray(pcm, dtype="<i2").tobytes())
    return buffer.getvalue()


class OpenAIASR(ASRBackend):
    """Transcribes each utterance with one request; `timeout_s` bounds the whole request."""

    name = "openai"

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key: str | None = None,
        language: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        self._url = base_url.rstrip("/") + "/audio/transcriptions"
        self._model = model
        self._language = language
        self._timeout_s = timeout_s
        self._client = httpx.AsyncClient(
            headers=bearer_headers(api_key), timeout=httpx.Timeout(timeout_s)
        )

    async def transcribe(self, pcm: np.ndarray, *, language: str | None = None) -> str:
        if pcm.dtype != PCM_DTYPE or pcm.ndim != 1:
            raise ASRError("Speech recognition needs mono 16-bit audio.")
        form = {"model": self._model, "response_format": "json"}
        if language := language or self._language:
            form["language"] = language
        files = {"file": ("speech.wav", wav_bytes(pcm), "audio/wav")}
        try:
            response = await self._client.post(self._url, data=form, files=files)
        except httpx.TimeoutException as exc:
            log.warning("ASR request to %s timed out: %r", self._url, exc)
            raise ASRError(f"The {_SERVICE} did not answer within {self._timeout_s:g} s.") from exc
        except httpx.HTTPError as exc:
            log.warning("ASR request to %s failed: %r", self._url, exc)
            raise ASRError(f"Cannot reach the {_SERVICE}.") from exc
        if (error := await http_error(_SERVICE, response)) is not None:
            log.warning("ASR request to %s: %s", self._url, error)
            raise ASRError(error)
        return _text_of(response)

    async def aclose(self) -> None:
        await self._client.aclose()


def _text_of(response: httpx.Response) -> str:
    if not response.headers.get("content-type", "").startswith("application/json"):
        return response.text.strip()
    try:
        payload = response.json()
    except ValueError as exc:
        raise ASRError(f"The {_SERVICE} sent malformed JSON.") from exc
    text = payload.get("text") if isinstance(payload, dict) else None
    if not isinstance(text, str):
        raise ASRError(f"The {_SERVICE} answered without a transcript text.")
    return text.strip()
