"""The MuseTalk 1.5 networks on batches (`scripts/realtime_inference.py`).

Per frame: audio tokens [50, 384] + positional encoding condition one UNet step (t = 0) on
the latents [masked crop ‖ reference crop] (8x32x32); the output is the scaled clean
latent of the whole 256x256 face crop, decoded by the VAE. No scheduler, no noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from gpuserver.engines.musetalk.models import MusetalkModels

AUDIO_DIM = 384  # whisper-tiny d_model = the UNet's cross_attention_dim
AUDIO_TOKENS = 50  # 10 whisper steps x 5 hidden states per video frame
CROP_SIZE = 256
LATENT_SHAPE = (8, CROP_SIZE // 8, CROP_SIZE // 8)


def positional_encoding(length: int = AUDIO_TOKENS, d_model: int = AUDIO_DIM) -> torch.Tensor:
    """The official `PositionalEncoding` table [length, d_model] (sin even, cos odd dims)."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    div_term = torch.exp(
        torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10000.0) / d_model)
    )
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table


class MusetalkPipeline:
    """Stateless batch operations on one model copy; call from one thread at a time per op."""

    def __init__(self, models: MusetalkModels) -> None:
        self.models = models
        self.device, self.dtype = models.device, models.dtype
        # Constant for every frame: the PE table and the t = 0 timestep.
        self._pe = positional_encoding().to(self.device, self.dtype)
        self._timestep = torch.zeros(1, dtype=torch.long, device=self.device)
        self._scale = float(models.vae.config.scaling_factor)  # 0.18215 for sd-vae-ft-mse

    @torch.inference_mode()
    def encode_audio(self, mels: np.ndarray) -> torch.Tensor:
        """Whisper log-mels [k, 80, 3000] -> all encoder hidden states [k, 1500, 5, 384].

        Stays on the device in the model dtype; `audio.frame_features` cuts it.
        """
        features = torch.from_numpy(mels).to(self.device, self.dtype)
        hidden = self.models.whisper(features, output_hidden_states=True).hidden_states
        return torch.stack(hidden, dim=2)

    @torch.inference_mode()
    def encode_crops(self, crops: np.ndarray) -> torch.Tensor:
        """256x256 BGR uint8 crops [B, 256, 256, 3] -> UNet latents [B, 8, 32, 32] (fp32, CPU).

        Channels 0-3: the crop with its lower half black (-1); 4-7: the whole crop (the
        reference). The posterior mean replaces the official `.sample()`: deterministic, and
        what training uses; sd-vae's posterior std is tiny.
        """
        rgb = torch.from_numpy(np.ascontiguousarray(crops[..., ::-1])).to(self.device)
        full = rgb.permute(0, 3, 1, 2).float().div(255)
        masked = full.clone()
        masked[:, :, CROP_SIZE // 2 :, :] = 0
        pixels = torch.cat([masked, full]).mul(2).sub(1).to(self.dtype)
        latents = self.models.vae.encode(pixels).latent_dist.mode() * self._scale
        count = len(crops)
        return torch.cat([latents[:count], latents[count:]], dim=1).float().cpu()

    @torch.inference_mode()
    def generate(self, latents: torch.Tensor, audio: torch.Tensor) -> np.ndarray:
        """Latents [B, 8, 32, 32] + audio tokens [B, 50, 384] -> BGR uint8 [B, 256, 256, 3]."""
        sample = latents.to(self.device, self.dtype)
        faces = self.generate_on_device(sample, audio.to(self.device, self.dtype))
        return faces.cpu().numpy()

    @torch.inference_mode()
    def generate_on_device(self, latents: torch.Tensor, audio: torch.Tensor) -> torch.Tensor:
        """`generate` on device tensors of the model dtype, without host transfers (so a
        benchmark can capture it in a CUDA graph): BGR uint8 [B, 256, 256, 3] on the device."""
        tokens = audio + self._pe
        predicted = self.models.unet(latents, self._timestep, encoder_hidden_states=tokens).sample
        image = self.models.vae.decode(predicted / self._scale).sample
        image = (image.float() / 2 + 0.5).clamp(0, 1).mul(255).round().to(torch.uint8)
        return image.permute(0, 2, 3, 1).flip(-1)
