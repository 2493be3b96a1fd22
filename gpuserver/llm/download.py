"""`gpuserver download-models llm`: a real small instruct model for the `local` LLM backend.

The model (a Hugging Face repo id, `llm.local_model_repo`) is fetched as a transformers
folder into `<folder>.partial` and renamed to `<folder>` (`llm.local_model_dir`) only when
complete, because the backend prefers that folder over the bundled SmolLM2 as soon as it
holds a config.json. huggingface_hub resumes an interrupted download from the partial folder.
Only weights in safetensors format and the tokenizer/config files are fetched.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1
# What from_pretrained needs; skips duplicate weight formats (pytorch_model.bin, gguf, onnx).
_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def download_llm(repo_id: str, folder: Path) -> int:
    """Fetch `repo_id` into `folder`; returns a process exit code."""
    if (folder / "config.json").is_file():
        logger.info("%s already holds a model; delete it to download %s again", folder, repo_id)
        return EXIT_OK
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        logger.error("huggingface_hub is not installed: pip install -e '.[local-llm]'")
        return EXIT_FAILED
    partial = folder.with_name(folder.name + ".partial")
    partial.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s into %s (about 1 GB for a 0.5B model) ...", repo_id, folder)
    try:
        snapshot_download(repo_id, local_dir=partial, allow_patterns=_PATTERNS)
    except Exception as exc:  # hub HTTP errors, no connection, unknown repo, disk errors
        logger.error(
            "cannot download %s: %s\nCheck the repo id and the internet connection (or "
            "HF_ENDPOINT for a mirror) and run the command again: finished files are kept.",
            repo_id,
            exc,
        )
        return EXIT_FAILED
    if not (partial / "config.json").is_file():
        logger.error("%s has no config.json: it is not a transformers model", repo_id)
        return EXIT_FAILED
    shutil.rmtree(partial / ".cache", ignore_errors=True)  # huggingface_hub's resume state
    partial.rename(folder)
    logger.info("LLM %s ready in %s: `gpuserver serve --llm local` uses it", repo_id, folder)
    return EXIT_OK
