"""BiSeNet face parsing and MuseTalk 1.5's "jaw" mask, for the blend mask.

A port of `musetalk/utils/face_parsing` (MIT, after zllrunning/face-parsing.PyTorch): module
names match the official checkpoint `79999_iter.pth` so it loads strictly. Only the main
output head is evaluated; the two auxiliary heads exist for the state dict.
"""

from __future__ import annotations

from functools import cache

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

PARSING_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CelebAMask-HQ labels.
SKIN, NOSE, MOUTH, UPPER_LIP, LOWER_LIP = 1, 10, 11, 12, 13
CHEEK_WIDTH = 90  # v1.5 scripts pass --left/right_cheek_width 90
CONE_HEIGHT, TAIL_HEIGHT = 21, 12


class ConvBNReLU(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(in_chan, out_chan, ks, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_chan: int, out_chan: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_chan)
        self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chan)
        self.downsample: nn.Module | None = None
        if in_chan != out_chan or stride != 1:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_chan, out_chan, 1, stride, bias=False), nn.BatchNorm2d(out_chan)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_chan, out_chan, stride), BasicBlock(out_chan, out_chan))


class Resnet18(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _layer(64, 64, 1)
        self.layer2 = _layer(64, 128, 2)
        self.layer3 = _layer(128, 256, 2)
        self.layer4 = _layer(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, out_chan)
        self.conv_atten = nn.Conv2d(out_chan, out_chan, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_chan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        atten = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean((2, 3), keepdim=True))))
        return feat * atten


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = Resnet18()
        self.arm16 = AttentionRefinementModule(256, 128)
        self.arm32 = AttentionRefinementModule(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        avg = self.conv_avg(feat32.mean((2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode="nearest")
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up


class FeatureFusionModule(nn.Module):
    def __init__(self, in_chan: int, out_chan: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
        self.conv1 = nn.Conv2d(out_chan, out_chan // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_chan // 4, out_chan, 1, bias=False)

    def forward(self, fsp: torch.Tensor, fcp: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([fsp, fcp], dim=1))
        atten = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean((2, 3), keepdim=True)))))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    def __init__(self, in_chan: int, mid_chan: int, n_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_chan, mid_chan)
        self.conv_out = nn.Conv2d(mid_chan, n_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    def __init__(self, n_classes: int = 19) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusionModule(256, 256)
        self.conv_out = BiSeNetOutput(256, 256, n_classes)
        self.conv_out16 = BiSeNetOutput(128, 64, n_classes)  # training-only heads
        self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits at the input resolution (the official `net(img)[0]`)."""
        feat8, feat_cp8 = self.cp(x)
        out = self.conv_out(self.ffm(feat8, feat_cp8))
        return F.interpolate(out, x.shape[2:], mode="bilinear", align_corners=True)


@torch.inference_mode()
def parse_labels(net: BiSeNet, image_bgr: np.ndarray) -> np.ndarray:
    """Per-pixel CelebAMask-HQ labels (512x512 int) of a BGR face crop."""
    device = next(net.parameters()).device
    # PIL's BILINEAR (official) filters when shrinking; INTER_AREA is cv2's closest match.
    shrink = max(image_bgr.shape[:2]) > PARSING_SIZE
    interpolation = cv2.INTER_AREA if shrink else cv2.INTER_LINEAR
    rgb = cv2.resize(image_bgr, (PARSING_SIZE, PARSING_SIZE), interpolation=interpolation)
    x = torch.from_numpy(np.ascontiguousarray(rgb[..., ::-1])).to(device)
    x = x.permute(2, 0, 1).float().div(255)
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    logits = net(((x - mean) / std)[None])[0]
    return logits.argmax(0).cpu().numpy()


@cache
def _jaw_kernels() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official cone-and-tail dilation kernel, cheek erosion kernel and cheek mask."""
    total = CONE_HEIGHT + TAIL_HEIGHT
    kernel = np.zeros((total, total), np.uint8)
    centre = total // 2
    for row in range(CONE_HEIGHT // 2, CONE_HEIGHT):
        half = row - CONE_HEIGHT // 2
        kernel[row, centre - half : centre + half + 1] = 1
    base_half = int(kernel[CONE_HEIGHT - 1].sum()) // 2
    kernel[CONE_HEIGHT:, max(0, centre - base_half) : min(total, centre + base_half + 1)] = 1
    cheek_kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (35, 3))
    cheeks = np.zeros((PARSING_SIZE, PARSING_SIZE), np.uint8)
    middle = PARSING_SIZE // 2
    cv2.rectangle(cheeks, (0, 0), (middle - CHEEK_WIDTH, PARSING_SIZE), 255, -1)
    cv2.rectangle(cheeks, (middle + CHEEK_WIDTH, 0), (PARSING_SIZE, PARSING_SIZE), 255, -1)
    return kernel, cheek_kernel, cheeks


def jaw_mask(labels: np.ndarray) -> np.ndarray:
    """MuseTalk 1.5 `mode="jaw"`: skin grown towards the jaw (eroded at the cheeks), minus
    the nose, plus mouth and lips; uint8 0/255 at the parsing resolution."""
    kernel, cheek_kernel, cheeks = _jaw_kernels()
    skin = np.where(labels == SKIN, 255, 0).astype(np.uint8)
    dilated = cv2.dilate(skin, kernel, iterations=1)
    eroded = cv2.erode(dilated, cheek_kernel, iterations=2)
    region = cv2.bitwise_or(cv2.bitwise_and(eroded, cheeks), cv2.bitwise_and(dilated, ~cheeks))
    keep = ((region == 255) & (labels != NOSE)) | np.isin(labels, (MOUTH, UPPER_LIP, LOWER_LIP))
    return np.where(keep, 255, 0).astype(np.uint8)
