"""BoneAgeNet: a ResNet-18-shaped CNN for one grayscale film, with the patient's sex as an input beside the pooled
features, an age-group head (`grp`) and a mean/log-sigma head (`unc`).

One network is trained on both sexes (sex per film), then fine-tuned per sex; a served model has its sex fixed in a
buffer (`male`), so the service's male and female models each take a film alone.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

# Age groups of the `grp` head, in years: [low, high).
AGE_GROUPS_YEARS: tuple[tuple[int, int], ...] = ((0, 5), (5, 10), (10, 15), (15, 20))
ARCHITECTURE = "BoneAgeNet-v2"
# Ages are regressed in standardised units so the heads start near the data's scale.
AGE_CENTER_MONTHS = 120.0
AGE_SCALE_MONTHS = 50.0
SEX_FEATURES = 32


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


def _stage(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(ResidualBlock(in_channels, out_channels, stride), ResidualBlock(out_channels, out_channels))


class BoneAgeNet(nn.Module):
    """Grayscale radiograph (+ sex) -> (`grp` logits of 4 age groups, `unc` = [mean, log sigma] of the age).

    ResNet-18's layout (7x7 stem with stride 2 and a max-pool, four stages of two residual blocks) on one channel.
    Downsampling is 16x before `cam_layer`, so at 224 px its feature map is 14x14 (Grad-CAM needs >= 12x12).
    The sex enters after pooling (`male`: 1.0 boy, 0.0 girl); `forward` takes it per film, or uses the buffer
    `male` of a model whose sex is fixed.
    """

    def __init__(self, input_size: int = 224, width: int = 64, dropout: float = 0.2, male: float = 0.5) -> None:
        super().__init__()
        self.input_size = input_size
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 7, 2, 3, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                                  nn.MaxPool2d(3, 2, 1))
        self.layer1 = _stage(w, w, 1)
        self.layer2 = _stage(w, 2 * w, 2)
        self.layer3 = _stage(2 * w, 4 * w, 2)
        self.layer4 = _stage(4 * w, 8 * w, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.sex = nn.Sequential(nn.Linear(1, SEX_FEATURES), nn.ReLU(inplace=True))
        self.hidden = nn.Sequential(nn.Linear(8 * w + SEX_FEATURES, 256), nn.ReLU(inplace=True), nn.Dropout(dropout))
        self.grp = nn.Linear(256, len(AGE_GROUPS_YEARS))
        self.unc = nn.Linear(256, 2)
        self.male: torch.Tensor
        self.register_buffer("male", torch.tensor(male))

    def set_sex(self, male: bool) -> None:
        """Fix the sex the model assumes when `forward` is not given one."""
        self.male.fill_(1.0 if male else 0.0)

    @property
    def cam_layer(self) -> nn.Module:
        """The layer whose activations Grad-CAM explains (14x14 at 224 px)."""
        return self.layer3

    def to_cam_layer(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> the CAM layer's activations (the first half of `forward`)."""
        result: torch.Tensor = self.cam_layer(self.layer2(self.layer1(self.stem(x))))
        return result

    def from_cam_layer(self, activations: torch.Tensor,
                       male: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The CAM layer's activations -> (`grp`, `unc`) (the second half of `forward`)."""
        return self.head(self.pooled_features(activations), male)

    def pooled_features(self, activations: torch.Tensor) -> torch.Tensor:
        """The CAM layer's activations -> the pooled features of the last stage, (N, 8 * width)."""
        return torch.flatten(self.pool(self.layer4(activations)), 1)

    def head(self, pooled: torch.Tensor, male: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled features (and the sex, else the model's own) -> (`grp` logits, `unc`: mean and log sigma)."""
        if male is None:
            male = self.male.expand(pooled.shape[0])
        sex = self.sex(male.to(pooled.dtype).view(-1, 1))
        features = self.hidden(torch.cat([pooled, sex], dim=1))
        return self.grp(features), self.unc(features)

    def forward(self, x: torch.Tensor, male: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.from_cam_layer(self.to_cam_layer(x), male)


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
    blocks = [*folded.layer1, *folded.layer2, *folded.layer3, *folded.layer4]
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
