"""`gpuserver download-models`: fetch the MuseTalk 1.5 weights into the official layout.

huggingface_hub shows a progress bar per file, resumes partial downloads and skips files
already complete. Only the required weights come from the hub; the optional face-parsing
checkpoint lives on Google Drive, so this prints where to put it instead.
"""

from __future__ import annotations

import logging
from pathlib import Path

from gpuserver.engines.musetalk.layout import (
    FACE_PARSING,
    FACE_PARSING_SOURCE,
    HUB_DOWNLOADS,
    MissingWeightsError,
    check_weights,
)

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1


def download_models(models_dir: Path) -> int:
    """Download every required file; returns a process exit code (0 when all are present)."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        logger.error("huggingface_hub is not installed: pip install -e '.[gpu]'")
        return EXIT_FAILED
    models_dir.mkdir(parents=True, exist_ok=True)
    for source in HUB_DOWNLOADS:
        target = models_dir / source.target
        for filename in source.filenames:
            logger.info("fetching %s/%s into %s", source.repo_id, filename, target)
            try:
                hf_hub_download(source.repo_id, filename, local_dir=target)
            except OSError as exc:  # hub HTTP errors, no connection and disk errors alike
                logger.error(
                    "cannot download %s from %s: %s\nCheck the internet connection (or "
                    "HF_ENDPOINT for a mirror) and run the command again: finished files "
                    "are kept.",
                    filename,
                    source.repo_id,
                    exc,
                )
                return EXIT_FAILED
    try:
        check_weights(models_dir)
    except MissingWeightsError as exc:
        logger.error("%s", exc)
        return EXIT_FAILED
    if FACE_PARSING.find(models_dir) is None:
        logger.info(
            "optional face parsing not installed: for the official blend masks put "
            "79999_iter.pth from %s at %s (without it an elliptical lower-face mask is used)",
            FACE_PARSING_SOURCE,
            models_dir / FACE_PARSING.path,
        )
    logger.info("MuseTalk weights ready in %s", models_dir)
    return EXIT_OK
