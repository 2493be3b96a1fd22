"""Model files from the Hugging Face Hub, for `gpuserver download-models` (never in tests).

huggingface_hub resumes partial files and skips complete ones, so a failed download is
simply run again.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubDownload:
    """Files of one Hugging Face repository, stored under `models_dir / target`."""

    repo_id: str
    filenames: tuple[str, ...]
    target: str


def fetch(sources: Iterable[HubDownload], models_dir: Path) -> bool:
    """Download every file of `sources` under `models_dir`; False (logged) on the first error."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        log.error("huggingface_hub is not installed: pip install huggingface_hub")
        return False
    for source in sources:
        target = models_dir / source.target
        for filename in source.filenames:
            log.info("fetching %s/%s into %s", source.repo_id, filename, target)
            try:
                hf_hub_download(source.repo_id, filename, local_dir=target)
            except OSError as exc:  # hub HTTP errors, no connection and disk errors alike
                log.error(
                    "cannot download %s from %s: %s\nCheck the internet connection (or "
                    "HF_ENDPOINT for a mirror) and run the command again: finished files "
                    "are kept.",
                    filename,
                    source.repo_id,
                    exc,
                )
                return False
    return True
