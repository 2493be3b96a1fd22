"""Where MuseTalk 1.5 weights live under `models_dir`, and where they come from.

The layout is the official one (`download_weights.sh`), so a models folder made by the
official scripts works as is. Torch-free: the download command and the missing-weights check
must not import the networks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from gpuserver.hub import HubDownload

DOWNLOAD_COMMAND = "gpuserver download-models"


@dataclass(frozen=True)
class WeightFile:
    """One weight file, relative to `models_dir`; `alternatives` are accepted instead."""

    path: str
    alternatives: tuple[str, ...] = ()

    def find(self, models_dir: Path) -> Path | None:
        for name in (self.path, *self.alternatives):
            candidate = models_dir / name
            if candidate.is_file():
                return candidate
        return None

    def require(self, models_dir: Path) -> Path:
        path = self.find(models_dir)
        if path is None:
            raise MissingWeightsError(models_dir, [self])
        return path

    def describe(self) -> str:
        if not self.alternatives:
            return self.path
        return f"{self.path} (or {', '.join(self.alternatives)})"


UNET_WEIGHTS = WeightFile("musetalkV15/unet.pth")
UNET_CONFIG = WeightFile("musetalkV15/musetalk.json")
VAE_DIR = "sd-vae"
VAE_CONFIG = WeightFile(f"{VAE_DIR}/config.json")
VAE_WEIGHTS = WeightFile(
    f"{VAE_DIR}/diffusion_pytorch_model.safetensors", (f"{VAE_DIR}/diffusion_pytorch_model.bin",)
)
WHISPER_DIR = "whisper"
WHISPER_CONFIG = WeightFile(f"{WHISPER_DIR}/config.json")
WHISPER_WEIGHTS = WeightFile(
    f"{WHISPER_DIR}/model.safetensors", (f"{WHISPER_DIR}/pytorch_model.bin",)
)
WHISPER_PREPROCESSOR = WeightFile(f"{WHISPER_DIR}/preprocessor_config.json")
REQUIRED = (
    UNET_WEIGHTS,
    UNET_CONFIG,
    VAE_CONFIG,
    VAE_WEIGHTS,
    WHISPER_CONFIG,
    WHISPER_WEIGHTS,
    WHISPER_PREPROCESSOR,
)

# BiSeNet face parsing for the blend mask: used whenever present (else an elliptical mask).
# The checkpoint holds the whole network, its ResNet-18 backbone included, so the official
# `resnet18-5c106cde.pth` (only an initialisation that this checkpoint overwrites) is not
# needed.
FACE_PARSING = WeightFile("face-parse-bisent/79999_iter.pth")
# The official download script fetches it from Google Drive (not a hub), with gdown; this is
# the direct-download form of the same file id.
FACE_PARSING_DRIVE_ID = "154JgKpzCPW82qINcVieuPH3fZ2e0P812"
FACE_PARSING_URL = (
    "https://drive.usercontent.google.com/download"
    f"?id={FACE_PARSING_DRIVE_ID}&export=download&confirm=t"
)


# The official sources (download_weights.sh); safetensors where the repository has them.
HUB_DOWNLOADS = (
    HubDownload("TMElyralab/MuseTalk", ("musetalkV15/musetalk.json", "musetalkV15/unet.pth"), "."),
    HubDownload(
        "stabilityai/sd-vae-ft-mse", ("config.json", "diffusion_pytorch_model.safetensors"), VAE_DIR
    ),
    HubDownload(
        "openai/whisper-tiny",
        ("config.json", "model.safetensors", "preprocessor_config.json"),
        WHISPER_DIR,
    ),
)


class MissingWeightsError(FileNotFoundError):
    """Required MuseTalk weight files are absent; `missing` names each, relative to the dir."""

    def __init__(self, models_dir: Path, missing: list[WeightFile]) -> None:
        self.models_dir = models_dir
        self.missing = [weight.describe() for weight in missing]
        listing = "\n".join(f"  - {name}" for name in self.missing)
        super().__init__(
            f"MuseTalk weights missing under {models_dir}:\n{listing}\n"
            f"Fetch them with `{DOWNLOAD_COMMAND}` (needs internet), or point "
            "GPUSERVER_ENGINE__MODELS_DIR (--config [engine] models_dir) at a folder that has them."
        )


def check_weights(models_dir: Path) -> None:
    """Raise MissingWeightsError naming every required file that `models_dir` lacks."""
    missing = [weight for weight in REQUIRED if weight.find(models_dir) is None]
    if missing:
        raise MissingWeightsError(models_dir, missing)
