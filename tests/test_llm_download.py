"""`gpuserver download-models llm`: a complete model folder or nothing (no real download here)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest

from gpuserver.llm import download, local
from gpuserver.unified_server import build_parser, main
from tests.llm_fixtures import write_tiny_llm

REPO = "Qwen/Qwen2.5-0.5B-Instruct"


@pytest.fixture(scope="module")
def hub_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the hub would serve: the tiny model's files."""
    return write_tiny_llm(tmp_path_factory.mktemp("hub") / "model")


@pytest.fixture
def fetched(monkeypatch: pytest.MonkeyPatch, hub_copy: Path) -> list[dict[str, Any]]:
    """snapshot_download replaced by a copy of `hub_copy`; records its calls."""
    import huggingface_hub

    calls: list[dict[str, Any]] = []

    def snapshot_download(repo_id: str, **options: Any) -> str:
        calls.append({"repo_id": repo_id, **options})
        shutil.copytree(hub_copy, options["local_dir"], dirs_exist_ok=True)
        return str(options["local_dir"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


def test_a_downloaded_model_lands_complete_where_the_backend_looks(
    tmp_path: Path, fetched: list[dict[str, Any]]
) -> None:
    folder = tmp_path / "models" / "llm"
    assert download.download_llm(REPO, folder) == 0
    assert [call["repo_id"] for call in fetched] == [REPO]
    assert "*.safetensors" in fetched[0]["allow_patterns"]
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert not folder.with_name("llm.partial").exists()
    assert local.find_model(folder) == local.ModelSource(folder)


def test_a_model_already_there_is_not_fetched_again(
    tmp_path: Path, fetched: list[dict[str, Any]], hub_copy: Path
) -> None:
    folder = tmp_path / "llm"
    shutil.copytree(hub_copy, folder)
    assert download.download_llm(REPO, folder) == 0
    assert fetched == []


def test_no_internet_fails_clearly_and_leaves_no_folder_the_backend_would_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, **options: Any) -> str:
        Path(options["local_dir"], "config.json").parent.mkdir(parents=True, exist_ok=True)
        Path(options["local_dir"], "config.json").write_text("{}")  # a partial download
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    folder = tmp_path / "llm"
    with caplog.at_level(logging.INFO, logger=download.__name__):
        assert download.download_llm(REPO, folder) == 1
    assert "internet connection" in caplog.text and "cannot reach the Hub" in caplog.text
    assert not folder.exists()
    assert local.find_model(folder).gguf_file is not None  # still the bundled model


def test_download_models_takes_targets_and_defaults_to_musetalk() -> None:
    parser = build_parser()
    assert parser.parse_args(["download-models"]).targets == ["musetalk"]
    assert parser.parse_args(["download-models", "llm"]).targets == ["llm"]
    with pytest.raises(SystemExit):
        parser.parse_args(["download-models", "nonsense"])


def test_the_cli_downloads_the_configured_repo_into_the_configured_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fetched: list[dict[str, Any]]
) -> None:
    folder = tmp_path / "custom-llm"
    monkeypatch.setenv("GPUSERVER_LLM__LOCAL_MODEL_DIR", str(folder))
    monkeypatch.setenv("GPUSERVER_LLM__LOCAL_MODEL_REPO", "HuggingFaceTB/SmolLM2-1.7B-Instruct")
    code = main(["download-models", "llm", "--log-dir", str(tmp_path / "logs")])
    assert code == 0
    assert [call["repo_id"] for call in fetched] == ["HuggingFaceTB/SmolLM2-1.7B-Instruct"]
    assert (folder / "config.json").is_file()
