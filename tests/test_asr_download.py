"""`download-models asr` with the hub replaced by a local copy: nothing is downloaded."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest

from gpuserver.asr.download import (
    ASR_MODELS,
    EXIT_FAILED,
    EXIT_OK,
    GPU_ASR_MODELS,
    download_asr_models,
)
from gpuserver.asr.whisper import missing_files
from gpuserver.config import ASRSettings
from tests.voice_fixtures import tiny_whisper_dir

__all__ = ["tiny_whisper_dir"]


def test_whisper_tiny_completes_the_default_model_dir() -> None:
    assert Path("models") / ASR_MODELS["whisper-tiny"].target == ASRSettings().model_dir


def test_fetches_every_file_into_the_models_folder(
    tiny_whisper_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fetched: list[tuple[str, str]] = []

    def from_tiny(repo_id: str, filename: str, local_dir: Path) -> str:
        fetched.append((repo_id, filename))
        Path(local_dir).mkdir(parents=True, exist_ok=True)
        if (tiny_whisper_dir / filename).is_file():  # the tiny model has no vocab/merges files
            shutil.copy(tiny_whisper_dir / filename, Path(local_dir) / filename)
        return str(Path(local_dir) / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_tiny)
    assert download_asr_models(tmp_path, GPU_ASR_MODELS) == EXIT_OK
    assert {repo for repo, _ in fetched} == {"openai/whisper-tiny", "openai/whisper-large-v3-turbo"}
    for name in GPU_ASR_MODELS:
        assert missing_files(tmp_path / ASR_MODELS[name].target) == []


def test_a_failed_download_is_a_failed_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def offline(repo_id: str, filename: str, local_dir: Path) -> str:
        raise OSError("no route to the hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert download_asr_models(tmp_path) == EXIT_FAILED
    assert "no route to the hub" in caplog.text and "run the command again" in caplog.text
