"""Load the MuseTalk 1.5 networks from the official layout (see `layout`).

fp16 on CUDA (as the official realtime script), fp32 on CPU; eval mode, no gradients. The
UNet is built on the meta device and takes the checkpoint's tensors directly, so the 850 M
parameters are not randomly initialised first just to be overwritten.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn
from transformers import WhisperFeatureExtractor, WhisperModel

from gpuserver.engines.musetalk import layout
from gpuserver.engines.musetalk.parsing import BiSeNet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MusetalkModels:
    unet: nn.Module  # UNet2DConditionModel, possibly wrapped by torch.compile
    vae: AutoencoderKL
    whisper: nn.Module  # the WhisperModel's encoder only
    feature_extractor: WhisperFeatureExtractor
    face_parser: BiSeNet | None
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    """ "auto" is the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def dtype_for(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def load_models(models_dir: Path, device: str = "auto", compile: bool = False) -> MusetalkModels:
    """The networks, ready for inference; MissingWeightsError names absent files."""
    layout.check_weights(models_dir)
    target = resolve_device(device)
    dtype = dtype_for(target)
    unet = load_unet(models_dir, dtype).to(target).eval()
    vae = AutoencoderKL.from_pretrained(models_dir / layout.VAE_DIR, torch_dtype=dtype)
    vae = vae.to(target).eval()
    whisper_dir = models_dir / layout.WHISPER_DIR
    whisper = WhisperModel.from_pretrained(whisper_dir, dtype=dtype).get_encoder()
    whisper = whisper.to(target).eval()
    extractor = WhisperFeatureExtractor.from_pretrained(whisper_dir)
    parser = load_face_parser(models_dir, target)
    if compile:
        # Per-module compilation: the UNet and the VAE decoder are the realtime path.
        unet = torch.compile(unet)
        vae.decoder = torch.compile(vae.decoder)  # type: ignore[assignment]
    logger.info(
        "MuseTalk loaded from %s on %s (%s%s)",
        models_dir,
        target,
        str(dtype).removeprefix("torch."),
        ", compiled" if compile else "",
    )
    return MusetalkModels(unet, vae, whisper, extractor, parser, target, dtype)


def load_unet(models_dir: Path, dtype: torch.dtype) -> UNet2DConditionModel:
    """`UNet2DConditionModel(**musetalk.json)` with `unet.pth` loaded strictly (official)."""
    config = json.loads(layout.UNET_CONFIG.require(models_dir).read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(config)
    state = torch.load(
        layout.UNET_WEIGHTS.require(models_dir), map_location="cpu", weights_only=True
    )
    # Cast the tensors, not the module: diffusers warns about casting a loaded model.
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    unet.load_state_dict(state, strict=True, assign=True)
    return unet


def load_face_parser(models_dir: Path, device: torch.device) -> BiSeNet | None:
    """BiSeNet when `face-parse-bisent/79999_iter.pth` exists; logs which mask is used."""
    path = layout.FACE_PARSING.find(models_dir)
    if path is None:
        logger.info(
            "blend masks: %s absent, using elliptical lower-face masks", layout.FACE_PARSING.path
        )
        return None
    parser = BiSeNet()
    parser.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    logger.info("blend masks: BiSeNet face parsing (%s, jaw mode)", path)
    return parser.to(device).eval()


def weights_fingerprint(models_dir: Path) -> str:
    """Identifies the weights avatar material depends on (VAE, face parsing), cheaply."""
    parts = []
    for weight in (layout.VAE_WEIGHTS, layout.FACE_PARSING):
        path = weight.find(models_dir)
        stat = path.stat() if path is not None else None
        parts.append(
            f"{weight.path}:{stat.st_size}:{stat.st_mtime_ns}" if stat else f"{weight.path}:-"
        )
    return ";".join(parts)
