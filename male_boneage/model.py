"""BoneAgeNet: a small residual CNN with an age-group head (`grp`) and a mean/log-sigma head (`unc`)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Age groups of the `grp` head, in years: [low, high).
AGE_GROUPS_YEARS: tuple[tuple[int, int], ...] = ((0, 5), (5, 10), (10, 15), (15, 20))
ARCHITECTURE = "BoneAgeNet-v1"
# Ages are regressed in standardised units so the heads start near the data's scale.
AGE_CENTER_MONTHS = 120.0
AGE_SCALE_MONTHS = 50.0


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1: nn.Module = nn.BatchNorm2d(out_channels)  # nn.Module: `fold_batch_norm` puts an Identity here
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2: nn.Module = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        result: torch.Tensor = self.relu(out + self.shortcut(x))
        return result


class BoneAgeNet(nn.Module):
    """Grayscale radiograph -> (`grp` logits of 4 age groups, `unc` = [mean, log sigma] of the age).

    Downsampling is 8x before `cam_layer`, so at 100 px its feature map is 13x13 (Grad-CAM needs >= 12x12);
    the same code trains at 256 or 512 px.
    """

    def __init__(self, input_size: int = 100, width: int = 32, dropout: float = 0.2) -> None:
        super().__init__()
        self.input_size = input_size
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.layer1 = ResidualBlock(w, w)
        self.layer2 = nn.Sequential(ResidualBlock(w, 2 * w, stride=2), ResidualBlock(2 * w, 2 * w))
        self.layer3 = nn.Sequential(ResidualBlock(2 * w, 4 * w, stride=2), ResidualBlock(4 * w, 4 * w))
        self.layer4 = nn.Sequential(ResidualBlock(4 * w, 8 * w, stride=2), ResidualBlock(8 * w, 8 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.grp = nn.Linear(8 * w, len(AGE_GROUPS_YEARS))
        self.unc = nn.Linear(8 * w, 2)

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose activations Grad-CAM explains (13x13 at 100 px)."""
        return self.layer3

    def to_cam_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> the CAM layer's activations (the first half of `forward`)."""
        result: torch.Tensor = self.cam_layer(self.layer2(self.layer1(self.stem(x))))
        return result

    def from_cam_layer(self, activations: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The CAM layer's activations -> (`grp`, `unc`) (the second half of `forward`)."""
        features = self.dropout(torch.flatten(self.pool(self.layer4(activations)), 1))
        return self.grp(features), self.unc(features)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_cam_layer(self.to_cam_layer(x))


class FlatOutput(nn.Module):
    """Wraps BoneAgeNet so one tensor `[grp logits (4), mean, log sigma]` comes out, as Grad-CAM expects."""

    def __init__(self, net: BoneAgeNet) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grp, unc = self.net(x)
        return torch.cat([grp, unc], dim=1)

    def from_cam_layer(self, activations: torch.Tensor) -> torch.Tensor:
        """`forward` from the CAM layer's activations on."""
        grp, unc = self.net.from_cam_layer(activations)
        return torch.cat([grp, unc], dim=1)


def fold_batch_norm(net: BoneAgeNet) -> BoneAgeNet:
    """A copy of an eval-mode `net` for inference, each BatchNorm folded into the convolution before it.

    The same function of the input (equal within float rounding: the tests compare the served estimates with the
    unfolded net's), one pass less over every feature map. Not for training: the running statistics are gone.
    """
    if net.training:
        raise ValueError("fold_batch_norm needs a net in eval mode")
    folded = copy.deepcopy(net)

    def fused(conv: nn.Module, bn: nn.Module) -> nn.Conv2d:
        if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
            raise TypeError(f"expected Conv2d then BatchNorm2d, got {type(conv).__name__}, {type(bn).__name__}")
        return fuse_conv_bn_eval(conv, bn)

    folded.stem = nn.Sequential(fused(folded.stem[0], folded.stem[1]), *folded.stem[2:])
    blocks = [folded.layer1, *folded.layer2, *folded.layer3, *folded.layer4]
    for block in blocks:
        if not isinstance(block, ResidualBlock):
            raise TypeError(f"expected a ResidualBlock, got {type(block).__name__}")
        block.conv1, block.bn1 = fused(block.conv1, block.bn1), nn.Identity()
        block.conv2, block.bn2 = fused(block.conv2, block.bn2), nn.Identity()
        if isinstance(block.shortcut, nn.Sequential):
            block.shortcut = nn.Sequential(fused(block.shortcut[0], block.shortcut[1]))
    return folded.eval()


def months_to_target(months: torch.Tensor) -> torch.Tensor:
    """Bone age in months -> the standardised unit the `unc` head regresses."""
    return (months - AGE_CENTER_MONTHS) / AGE_SCALE_MONTHS


def target_to_months(target: torch.Tensor) -> torch.Tensor:
    """Inverse of `months_to_target`."""
    return target * AGE_SCALE_MONTHS + AGE_CENTER_MONTHS


def age_group_index(months: torch.Tensor) -> torch.Tensor:
    """Index of the 5-year age group for ages in months (ages of 20 years and more fall in the last)."""
    return torch.clamp((months / 60.0).long(), 0, len(AGE_GROUPS_YEARS) - 1)
