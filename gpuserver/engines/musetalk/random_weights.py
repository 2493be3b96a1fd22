"""Random-weight MuseTalk networks saved in the official layout, for tests and benchmarks.

"tiny" keeps every interface shape (8x32x32 latents for 256x256 crops, 4 latent channels
at /8, whisper d_model 384 with 4 encoder layers -> 5 hidden states, 30 s input) with
minimal widths, so the real loading and inference code runs on a CPU in milliseconds.
"full" is MuseTalk 1.5's real geometry (musetalk.json, sd-vae-ft-mse, whisper-tiny) for
timing on a GPU. The pictures are noise either way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

from gpuserver.engines.musetalk import layout
from gpuserver.engines.musetalk.parsing import BiSeNet

Shapes = Literal["tiny", "full"]

# The official models/musetalkV15/musetalk.json.
FULL_UNET: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
}
TINY_UNET: dict[str, Any] = {
    **FULL_UNET,
    "attention_head_dim": 4,
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "sample_size": 32,
}
# stabilityai/sd-vae-ft-mse.
FULL_VAE: dict[str, Any] = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 256,
}
TINY_VAE: dict[str, Any] = {
    **FULL_VAE,
    "block_out_channels": [8, 8, 8, 8],
    "layers_per_block": 1,
    "norm_num_groups": 4,
}
# openai/whisper-tiny (transformers' WhisperConfig defaults are whisper-tiny's).
FULL_WHISPER: dict[str, Any] = {}
TINY_WHISPER: dict[str, Any] = {
    "encoder_ffn_dim": 64,
    "decoder_layers": 1,
    "decoder_attention_heads": 2,
    "decoder_ffn_dim": 64,
    "vocab_size": 64,
    "max_target_positions": 16,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "decoder_start_token_id": 1,
    "begin_suppress_tokens": None,
    "suppress_tokens": None,
}
SHAPES = {
    "tiny": (TINY_UNET, TINY_VAE, TINY_WHISPER),
    "full": (FULL_UNET, FULL_VAE, FULL_WHISPER),
}


def write_random_weights(
    models_dir: Path,
    shapes: Shapes = "tiny",
    seed: int = 0,
    face_parsing: bool = False,
    unet_dtype: torch.dtype = torch.float32,
) -> Path:
    """Random networks in the official file layout under `models_dir`; returns it.

    `unet_dtype` is the UNet file's precision (fp16 halves the full UNet's 3.4 GB).
    """
    torch.manual_seed(seed)
    unet_config, vae_config, whisper_config = SHAPES[shapes]
    unet_dir = models_dir / Path(layout.UNET_WEIGHTS.path).parent
    unet_dir.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": "UNet2DConditionModel", **unet_config}
    (models_dir / layout.UNET_CONFIG.path).write_text(json.dumps(config, indent=2))
    state = UNet2DConditionModel.from_config(unet_config).state_dict()
    state = {name: tensor.to(unet_dtype) for name, tensor in state.items()}
    torch.save(state, models_dir / layout.UNET_WEIGHTS.path)
    del state
    AutoencoderKL(**vae_config).save_pretrained(models_dir / layout.VAE_DIR)
    whisper_dir = models_dir / layout.WHISPER_DIR
    WhisperModel(WhisperConfig(**whisper_config)).save_pretrained(whisper_dir)
    WhisperFeatureExtractor().save_pretrained(whisper_dir)  # whisper's 80-mel defaults
    if face_parsing:
        write_random_face_parser(models_dir)
    return models_dir


def write_random_face_parser(models_dir: Path) -> None:
    path = models_dir / layout.FACE_PARSING.path
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(BiSeNet().state_dict(), path)
