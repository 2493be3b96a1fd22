"""The `whisper` ASR: a tiny random-weight Whisper of the real class in the real folder layout.

Random weights say nothing, so these tests pin loading, the threading and the error paths;
the text is noise but a string.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from gpuserver.asr import create_asr
from gpuserver.asr.base import ASRError
from gpuserver.asr.whisper import WhisperASR, WhisperTranscriber, missing_files
from gpuserver.config import ASRSettings
from tests.voice_fixtures import Speech, question, tiny_whisper_dir

__all__ = ["question", "tiny_whisper_dir"]


async def test_loads_the_folder_and_transcribes_to_a_string_in_a_worker_process(
    tiny_whisper_dir: Path, question: Speech
) -> None:
    asr = create_asr(ASRSettings(backend="whisper", model_dir=tiny_whisper_dir, device="cpu"))
    assert isinstance(asr, WhisperASR)
    try:
        text = await asr.transcribe(question.pcm)
        detected = await asr.transcribe(question.pcm, language="fr")
        assert asr.ready
        worker = asr._worker.pid
    finally:
        await asr.aclose()
    assert isinstance(text, str) and isinstance(detected, str)
    assert worker is not None and worker != os.getpid(), "inference never holds our GIL"


def test_transcriber_pickles_without_its_model_and_loads_where_it_is_used(
    tiny_whisper_dir: Path,
) -> None:
    transcriber = WhisperTranscriber(tiny_whisper_dir, "cpu")
    transcriber.load()
    copy = pickle.loads(pickle.dumps(transcriber))
    assert len(pickle.dumps(transcriber)) < 1000  # the weights stay behind
    assert (copy.model_dir, copy.device) == (tiny_whisper_dir, "cpu")
    assert isinstance(copy.transcribe(np.zeros(8000, np.int16), "en"), str)


def test_empty_audio_gives_empty_text_and_an_unknown_language_a_clear_error(
    tiny_whisper_dir: Path,
) -> None:
    transcriber = WhisperTranscriber(tiny_whisper_dir, "cpu")
    assert transcriber.transcribe(np.zeros(0, np.int16), "en") == ""
    with pytest.raises(ASRError, match="does not know the language 'xx'"):
        transcriber.transcribe(np.zeros(8000, np.int16), "xx")


def test_musetalk_whisper_folder_without_tokenizer_names_what_is_missing(
    tiny_whisper_dir: Path, tmp_path: Path
) -> None:
    """MuseTalk's download brings config, weights and preprocessor only."""
    folder = tmp_path / "whisper"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        shutil.copy(tiny_whisper_dir / name, folder / name)
    assert missing_files(folder) == [
        "generation_config.json",
        "tokenizer_config.json",
        "tokenizer.json or vocab.json",
    ]
    with pytest.raises(ASRError, match="download-models asr"):
        WhisperASR(folder)


def test_missing_folder_is_an_error_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ASRError, match=r"lacks config\.json, model\.safetensors or pytorch"):
        create_asr(ASRSettings(backend="whisper", model_dir=tmp_path / "nowhere"))


async def test_a_broken_checkpoint_fails_each_request_with_a_safe_message(
    tiny_whisper_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "whisper"
    shutil.copytree(tiny_whisper_dir, folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "whisper", "d_model": -1}))
    asr = WhisperASR(folder, device="cpu")
    try:
        with pytest.raises(ASRError, match=r"^Speech recognition failed\.$"):
            await asr.transcribe(np.zeros(8000, np.int16))
        assert not asr.ready
    finally:
        await asr.aclose()
