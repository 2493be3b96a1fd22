"""MuseTalk weights: the official layout loads; missing files and offline downloads fail clearly."""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from gpuserver.config import EngineSettings
from gpuserver.engines import create_engine
from gpuserver.engines import download as download_module
from gpuserver.engines.musetalk import layout
from gpuserver.engines.musetalk.layout import MissingWeightsError
from gpuserver.engines.musetalk.models import load_models, resolve_device
from tests.musetalk_fixtures import parsing_models_dir, tiny_models_dir

__all__ = ["parsing_models_dir", "tiny_models_dir"]

REQUIRED_NAMES = [
    "musetalkV15/unet.pth",
    "musetalkV15/musetalk.json",
    "sd-vae/config.json",
    "sd-vae/diffusion_pytorch_model.safetensors",
    "whisper/config.json",
    "whisper/model.safetensors",
    "whisper/preprocessor_config.json",
]


def test_missing_weights_name_every_file_and_the_download_command(tmp_path: Path) -> None:
    settings = EngineSettings(name="musetalk", models_dir=tmp_path / "models")
    with pytest.raises(MissingWeightsError) as caught:
        create_engine("musetalk", settings=settings)
    message = str(caught.value)
    for name in REQUIRED_NAMES:
        assert name in message
    assert "gpuserver download-models" in message
    assert len(caught.value.missing) == len(REQUIRED_NAMES)


def test_only_the_missing_files_are_named(tiny_models_dir: Path, tmp_path: Path) -> None:
    partial = tmp_path / "models"
    shutil.copytree(tiny_models_dir, partial)
    (partial / "musetalkV15" / "unet.pth").unlink()
    (partial / "whisper" / "model.safetensors").rename(partial / "whisper" / "pytorch_model.bin")
    with pytest.raises(MissingWeightsError) as caught:
        layout.check_weights(partial)
    assert caught.value.missing == ["musetalkV15/unet.pth"]  # the .bin alternative counts


def test_the_official_layout_loads_fp32_on_cpu(
    parsing_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with caplog.at_level(logging.INFO, logger="gpuserver.engines.musetalk.models"):
        models = load_models(parsing_models_dir, "cpu")
    assert models.dtype == torch.float32 and models.device.type == "cpu"
    assert models.unet.conv_in.weight.shape[1] == 8
    assert models.unet.config.cross_attention_dim == 384
    assert models.vae.config.latent_channels == 4 and models.vae.config.scaling_factor == 0.18215
    assert not any(p.is_meta for p in models.unet.parameters())
    assert not any(b.is_meta for b in models.unet.buffers())
    assert models.face_parser is not None
    assert "BiSeNet face parsing" in caplog.text


def test_without_face_parsing_weights_the_ellipse_is_used(
    tiny_models_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="gpuserver.engines.musetalk.models"):
        assert load_models(tiny_models_dir, "cpu").face_parser is None
    assert "elliptical lower-face masks" in caplog.text


def test_download_reports_no_internet_and_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def offline(repo_id: str, filename: str, **kwargs: object) -> str:
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with caplog.at_level(logging.INFO, logger=download_module.__name__):
        assert download_module.download_models(tmp_path / "models") == 1
    assert "internet connection" in caplog.text and "cannot reach the Hub" in caplog.text


@pytest.fixture
def file_server() -> Iterator[tuple[str, dict[str, bytes]]]:
    """A loopback HTTP server answering GET /<name> with `files[name]` (else 404)."""
    files: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = files.get(self.path.lstrip("/").split("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    thread.join()


def fake_hub(tiny_models_dir: Path, fetched: list[tuple[str, str]]) -> object:
    sources = {d.repo_id: d.target for d in layout.HUB_DOWNLOADS}

    def fake_download(repo_id: str, filename: str, local_dir: Path) -> str:
        fetched.append((repo_id, filename))
        source = tiny_models_dir / sources[repo_id] / filename
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    return fake_download


def test_download_fetches_the_official_files_and_face_parsing(
    parsing_models_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    file_server: tuple[str, dict[str, bytes]],
) -> None:
    import huggingface_hub

    fetched: list[tuple[str, str]] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub(parsing_models_dir, fetched))
    url, files = file_server
    files["drive"] = (parsing_models_dir / layout.FACE_PARSING.path).read_bytes()
    monkeypatch.setattr(layout, "FACE_PARSING_URL", f"{url}/drive?id=x&confirm=t")
    models = tmp_path / "models"
    assert download_module.download_models(models) == 0
    assert ("TMElyralab/MuseTalk", "musetalkV15/unet.pth") in fetched
    assert {repo for repo, _ in fetched} == {
        "TMElyralab/MuseTalk",
        "stabilityai/sd-vae-ft-mse",
        "openai/whisper-tiny",
    }
    layout.check_weights(models)
    assert load_models(models, "cpu").face_parser is not None  # the parsing mask by default
    assert not list(models.rglob("*.part"))


def test_a_face_parsing_download_that_is_not_the_checkpoint_is_discarded(
    tmp_path: Path,
    file_server: tuple[str, dict[str, bytes]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    url, files = file_server
    files["drive"] = b"<html>Google Drive - Quota exceeded</html>"
    with caplog.at_level(logging.INFO, logger=download_module.__name__):
        assert not download_module.download_face_parsing(tmp_path, f"{url}/drive")
        assert not download_module.download_face_parsing(tmp_path, f"{url}/missing")
    assert not list(tmp_path.rglob("*.pth*"))
    assert "not the BiSeNet checkpoint" in caplog.text and "404" in caplog.text
    assert layout.FACE_PARSING_DRIVE_ID in caplog.text
