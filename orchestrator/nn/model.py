"""3D ResNets for subtomogram classification, built from a params table (MONAI style).

Input is ``[B, C, D, H, W]`` (C = 1 for a tomogram, 32³–40³ voxels); ``forward`` returns logits.
Every model also exposes the two halves of ``forward`` that selection strategies need:

- ``model.features(x) -> [B, E]``: penultimate features after global average pooling
  (core-set embeddings; BADGE's gradient embeddings are built from these and ``model.fc``);
- ``model.classify(features) -> [B, C]``: dropout, then the final Linear ``model.fc``;
- ``model.stage_outputs(x) -> [stage 1 output, …]``: intermediate features for auxiliary
  modules (``orchestrator/nn/auxiliary.py``); ``model(x, return_stages=True)`` gives logits and
  these from one forward.

``forward(x) == classify(features(x))``. Dropout sits only before ``fc``, so in eval mode the
model is deterministic and BatchNorm uses its running statistics: outputs of a row do not
depend on which other rows share its batch (what row-wise scoring relies on).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["MODEL_PARAMS", "STEMS", "ResNet3d", "BasicBlock3d", "build_model"]

# name -> (block kind, blocks per stage). Stage i has width * 2**i channels; every stage after
# the first halves the spatial size. "resnet_tiny" has two stages: a model for tests and a
# quick CPU run, not for accuracy.
MODEL_PARAMS: dict[str, tuple[str, list[int]]] = {
    "resnet_tiny": ("basic", [1, 1]),
    "resnet10": ("basic", [1, 1, 1, 1]),
    "resnet18": ("basic", [2, 2, 2, 2]),
    "resnet34": ("basic", [3, 4, 6, 3]),
}

# "full": the ImageNet/paper stem, 7³ conv stride 2 + max-pool: stage 1 runs at 1/4 of the
#   input size (8³ for a 32³ volume), cheap.
# "small": one 3³ conv stride 1, no pool: stage 1 runs at full resolution, which keeps detail
#   of 32³ inputs but costs ~64x more FLOPs in the first stage.
STEMS = ("full", "small")


class BasicBlock3d(nn.Module):
    """Two 3³ convolutions with a residual connection (ResNet-18/34's block)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv3d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm3d(planes)
        self.conv2 = nn.Conv3d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm3d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Sequential(
                nn.Conv3d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm3d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


_BLOCKS = {"basic": BasicBlock3d}


class ResNet3d(nn.Module):
    """A 3D ResNet: stem, stages of residual blocks, global average pool, dropout, Linear."""

    def __init__(
        self,
        block: str,
        layers: list[int],
        num_classes: int,
        width: int = 64,
        stem: str = "full",
        dropout: float = 0.0,
        in_channels: int = 1,
    ):
        super().__init__()
        if block not in _BLOCKS:
            raise ValueError(f"unknown block {block!r}; valid: {sorted(_BLOCKS)}")
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid: {list(STEMS)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_classes < 1 or width < 1:
            raise ValueError(f"num_classes and width must be >= 1, got {num_classes}, {width}")
        block_cls = _BLOCKS[block]

        if stem == "full":
            self.stem = nn.Sequential(
                nn.Conv3d(in_channels, width, 7, stride=2, padding=3, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
                nn.MaxPool3d(3, stride=2, padding=1),
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv3d(in_channels, width, 3, stride=1, padding=1, bias=False),
                nn.BatchNorm3d(width),
                nn.ReLU(inplace=True),
            )

        stages = []
        in_planes = width
        for i, n_blocks in enumerate(layers):
            planes = width * 2**i
            blocks = []
            for j in range(n_blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(block_cls(in_planes, planes, stride))
                in_planes = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.embedding_dim = in_planes
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(in_planes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv3d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm3d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``[B, E]`` (after global pooling, before dropout)."""
        return torch.flatten(self.pool(self.stages(self.stem(x))), 1)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output ``[B, width·2^i, d, h, w]``, first to last: the intermediate
        features that auxiliary modules (learning loss, HAL's discriminator) read."""
        out, h = [], self.stem(x)
        for stage in self.stages:
            h = stage(h)
            out.append(h)
        return out

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from features: dropout (train mode only) then ``fc``."""
        return self.fc(self.dropout(features))

    def forward(self, x: torch.Tensor, return_stages: bool = False):
        """Logits; with ``return_stages`` also ``stage_outputs(x)`` from the same forward (a
        training step that feeds an auxiliary module goes through DDP's wrapper this way)."""
        if not return_stages:
            return self.classify(self.features(x))
        stages = self.stage_outputs(x)
        return self.classify(torch.flatten(self.pool(stages[-1]), 1)), stages


def build_model(
    name: str = "resnet18",
    *,
    num_classes: int,
    width: int = 64,
    stem: str = "full",
    dropout: float = 0.0,
    in_channels: int = 1,
) -> ResNet3d:
    """Build a 3D ResNet by name (a key of ``MODEL_PARAMS``).

    ``width`` is the first stage's channel count (64 in the paper's ResNet-18); narrower models
    cost ~width² less. ``dropout`` > 0 is needed for MC-dropout strategies.
    """
    if name not in MODEL_PARAMS:
        raise ValueError(f"unknown model {name!r}; valid: {sorted(MODEL_PARAMS)}")
    block, layers = MODEL_PARAMS[name]
    return ResNet3d(block, list(layers), num_classes, width=width, stem=stem,
                    dropout=dropout, in_channels=in_channels)
