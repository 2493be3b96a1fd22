"""`gpuserver download-models asr`: Whisper checkpoints for the `whisper` ASR backend.

whisper-tiny goes to models/whisper, the folder MuseTalk's audio features already use (its
download there fetches only the weights; the recogniser also needs the tokenizer and the
generation config, added here). whisper-large-v3-turbo (1.6 GB, fp16 on a GPU) is the larger
recogniser for GPU boxes: point asr.model_dir at models/whisper-large-v3-turbo.
Never run in tests.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from gpuserver.asr.whisper import missing_files
from gpuserver.hub import HubDownload, fetch

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1

_TOKENIZER_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
    "normalizer.json",
    "added_tokens.json",
    "special_tokens_map.json",
)
_CHECKPOINT_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")

ASR_MODELS = {
    "whisper-tiny": HubDownload(
        "openai/whisper-tiny", _CHECKPOINT_FILES + _TOKENIZER_FILES, "whisper"
    ),
    "whisper-large-v3-turbo": HubDownload(
        "openai/whisper-large-v3-turbo",
        _CHECKPOINT_FILES + _TOKENIZER_FILES,
        "whisper-large-v3-turbo",
    ),
}
DEFAULT_ASR_MODELS = ("whisper-tiny",)
GPU_ASR_MODELS = ("whisper-tiny", "whisper-large-v3-turbo")


def download_asr_models(models_dir: Path, names: Iterable[str] = DEFAULT_ASR_MODELS) -> int:
    """Fetch the named checkpoints (keys of ASR_MODELS); returns a process exit code."""
    sources = [ASR_MODELS[name] for name in names]
    if not fetch(sources, models_dir):
        return EXIT_FAILED
    for source in sources:
        folder = models_dir / source.target
        if missing := missing_files(folder):
            log.error("%s is still missing %s", folder, ", ".join(missing))
            return EXIT_FAILED
        log.info("Whisper recogniser ready in %s (asr.model_dir)", folder)
    return EXIT_OK
