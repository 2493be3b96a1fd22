"""`gpuserver download-models`: fetch the MuseTalk 1.5 weights into the official layout.

huggingface_hub shows a progress bar per file, resumes partial downloads and skips files
already complete. The face-parsing checkpoint lives on Google Drive (as in the official
download script): it is streamed to a `.part` file and kept only once it loads strictly into
the BiSeNet port, so an HTML error page (Drive's quota notice) never poses as weights.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from tqdm import tqdm

from gpuserver.engines.musetalk import layout
from gpuserver.engines.musetalk.layout import (
    FACE_PARSING,
    HUB_DOWNLOADS,
    MissingWeightsError,
    check_weights,
)
from gpuserver.hub import fetch

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
CHUNK_BYTES = 1 << 20
TIMEOUT = httpx.Timeout(30.0, read=120.0)


def download_models(models_dir: Path) -> int:
    """Download every file; returns a process exit code (0 when all are present)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    if not fetch(HUB_DOWNLOADS, models_dir):
        return EXIT_FAILED
    try:
        check_weights(models_dir)
    except MissingWeightsError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    if not download_face_parsing(models_dir, layout.FACE_PARSING_URL):
        return EXIT_FAILED
    logger.info("MuseTalk weights ready in %s", models_dir)
    return EXIT_OK


def download_face_parsing(models_dir: Path, url: str) -> bool:
    """Fetch `face-parse-bisent/79999_iter.pth` unless present; False (logged) on failure."""
    target = models_dir / FACE_PARSING.path
    if target.is_file():
        logger.info("face parsing already in %s", target)
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".part")
    logger.info("fetching the face-parsing checkpoint into %s", target)
    try:
        _stream_to(url, partial)
        _check_face_parser(partial)
    except (httpx.HTTPError, OSError, ValueError) as exc:
        partial.unlink(missing_ok=True)
        logger.error(
            "cannot download the face-parsing weights: %s\nRun the command again later, or "
            "put 79999_iter.pth (Google Drive id %s, from MuseTalk's download_weights.sh) at "
            "%s. Without it the engine blends with an elliptical mask.",
            exc,
            layout.FACE_PARSING_DRIVE_ID,
            target,
        )
        return False
    partial.replace(target)
    return True


def _stream_to(url: str, path: Path) -> None:
    with (
        httpx.stream("GET", url, follow_redirects=True, timeout=TIMEOUT) as response,
        path.open("wb") as file,
    ):
        response.raise_for_status()
        total = int(response.headers.get("content-length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=FACE_PARSING.path) as bar:
            for chunk in response.iter_bytes(CHUNK_BYTES):
                file.write(chunk)
                bar.update(len(chunk))


def _check_face_parser(path: Path) -> None:
    """ValueError unless `path` is a checkpoint that loads strictly into BiSeNet."""
    import pickle

    import torch

    from gpuserver.engines.musetalk.parsing import BiSeNet

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        BiSeNet().load_state_dict(state, strict=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, AttributeError, TypeError) as exc:
        raise ValueError(f"the downloaded file is not the BiSeNet checkpoint ({exc})") from exc
