"""The `whisper` ASR: a transformers Whisper model from a local folder, in a worker process.

The folder is a Hugging Face Whisper checkpoint (config, weights, preprocessor, generation
config, tokenizer). models/whisper, where the MuseTalk setup puts whisper-tiny, lacks the
tokenizer and generation config until `gpuserver download-models asr` adds them. Nothing is
ever downloaded here. fp16 on CUDA, fp32 on CPU.

Process model. `WhisperTranscriber` is the synchronous, picklable inference object: only
the folder and device travel, the model loads in whichever process uses it. `WhisperASR`
runs one in a `ProcessWorker` at lower priority — inference holds the GIL for the length of
an utterance, which the media path's interpreter cannot spare — loading first, then
utterances one at a time."""

from __future__ import annotations

import functools
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from gpuserver.asr.base import ASRBackend, ASRError
from gpuserver.media import SAMPLE_RATE
from gpuserver.process_worker import ProcessWorker, Reply

log = logging.getLogger(__name__)

DOWNLOAD_COMMAND = "gpuserver download-models asr"
_RUNTIME_PACKAGES = ("torch", "transformers")
# Each entry is satisfied by any one of its names.
_REQUIRED_FILES = (
    ("config.json",),
    ("model.safetensors", "pytorch_model.bin"),
    ("preprocessor_config.json",),
    ("generation_config.json",),
    ("tokenizer_config.json",),
    ("tokenizer.json", "vocab.json"),
)


def missing_files(model_dir: Path) -> list[str]:
    """The checkpoint files `model_dir` lacks ("a or b" where either will do)."""
    return [
        " or ".join(names)
        for names in _REQUIRED_FILES
        if not any((model_dir / name).is_file() for name in names)
    ]


def check_model_dir(model_dir: Path) -> None:
    """Raise ASRError saying what is missing (runtime packages or files) and how to get it."""
    packages = [name for name in _RUNTIME_PACKAGES if importlib.util.find_spec(name) is None]
    if packages:
        raise ASRError(
            f"The whisper speech recognition needs {', '.join(packages)}: "
            "`pip install 'gpuserver[whisper]'`."
        )
    if missing := missing_files(model_dir):
        raise ASRError(
            f"The Whisper model folder {model_dir} lacks {', '.join(missing)}: run "
            f"`{DOWNLOAD_COMMAND}` (needs internet) or set asr.model_dir to a Whisper checkpoint."
        )


class WhisperTranscriber:
    """Synchronous Whisper inference: 16 kHz mono int16 in, text out.

    Pickles as (model_dir, device) only; the model loads on first use in the receiving
    process. `device` "auto" means CUDA when available (fp16), else CPU (fp32).
    """

    def __init__(self, model_dir: Path, device: str = "auto") -> None:
        self.model_dir = model_dir
        self.device = device
        self._loaded: _Loaded | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"model_dir": self.model_dir, "device": self.device}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.model_dir, self.device = state["model_dir"], state["device"]
        self._loaded = None

    def load(self) -> None:
        """Load the model now (the first `transcribe` would otherwise)."""
        if self._loaded is None:
            self._loaded = _Loaded(self.model_dir, self.device)

    def transcribe(self, pcm: np.ndarray, language: str | None = None) -> str:
        """The text in `pcm`; `language` an ISO-639-1 code, None to detect it."""
        self.load()
        assert self._loaded is not None
        return self._loaded.transcribe(pcm, language)


class _Loaded:
    """The model, feature extractor and tokenizer of one checkpoint on one device."""

    def __init__(self, model_dir: Path, device: str) -> None:
        import torch
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        check_model_dir(model_dir)
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._torch = torch
        self._device = torch.device(device)
        self._dtype = torch.float16 if self._device.type == "cuda" else torch.float32
        started = time.monotonic()
        processor = WhisperProcessor.from_pretrained(model_dir, local_files_only=True)
        self._features = processor.feature_extractor
        self._tokenizer = processor.tokenizer
        self._model = WhisperForConditionalGeneration.from_pretrained(
            model_dir, dtype=self._dtype, local_files_only=True
        ).to(self._device)
        self._model.eval()
        generation = self._model.generation_config
        self._multilingual = bool(getattr(generation, "is_multilingual", False))
        self._languages = set(getattr(generation, "lang_to_id", None) or {})
        log.info(
            "Whisper ASR loaded from %s on %s (%s) in %.1f s",
            model_dir,
            self._device,
            str(self._dtype).removeprefix("torch."),
            time.monotonic() - started,
        )

    def transcribe(self, pcm: np.ndarray, language: str | None) -> str:
        if len(pcm) == 0:
            return ""
        options: dict[str, Any] = {}
        if self._multilingual:  # English-only checkpoints take neither option
            options["task"] = "transcribe"
            if language:
                if f"<|{language}|>" not in self._languages:
                    raise ASRError(f"Whisper does not know the language {language!r}.")
                options["language"] = language
        audio = pcm.astype(np.float32) / 32768.0
        features = self._features(audio, sampling_rate=SAMPLE_RATE, return_tensors="pt")
        inputs = features.input_features.to(self._device, self._dtype)
        with self._torch.inference_mode():
            ids = self._model.generate(inputs, **options)
        return str(self._tokenizer.batch_decode(ids, skip_special_tokens=True)[0]).strip()


class _TranscriberService:
    """In the worker process: a loaded WhisperTranscriber answering (pcm, language)."""

    def __init__(self, model_dir: Path, device: str) -> None:
        self._transcriber = WhisperTranscriber(model_dir, device)
        self._transcriber.load()  # the worker is ready once the model is

    def handle(self, request: tuple[np.ndarray, str | None], reply: Reply) -> None:
        pcm, language = request
        reply.send(self._transcriber.transcribe(pcm, language))


class WhisperASR(ASRBackend):
    """A WhisperTranscriber in a worker process (inference holds the GIL: it must not share
    the interpreter with the media path); loading starts at construction.

    Construction checks the folder (ASRError says what is missing). Utterances of all
    sessions are transcribed one at a time, served in turns by session.
    """

    name = "whisper"

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "auto",
        language: str | None = None,
        niceness: int = 10,
    ) -> None:
        check_model_dir(model_dir)
        self._language = language
        factory = functools.partial(_TranscriberService, model_dir, device)
        self._worker = ProcessWorker(factory, name="whisper-asr", niceness=niceness)
        self._worker.start()

    @property
    def ready(self) -> bool:
        return self._worker.ready

    async def transcribe(self, pcm: np.ndarray, *, language: str | None = None) -> str:
        request = (pcm, language or self._language)
        try:
            async for text in self._worker.submit(request):
                return str(text)
        except ASRError:
            raise
        except Exception as exc:  # the model failed to load, the worker crashed...
            log.exception("Whisper transcription failed")
            raise ASRError("Speech recognition failed.") from exc
        raise ASRError("Speech recognition returned nothing.")

    async def aclose(self) -> None:
        await self._worker.aclose()
