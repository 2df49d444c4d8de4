"""CIFAR-10 classifiers used as feature extractors for classifier-based feature distillation.

Every classifier returns ``(logits, features)`` where ``features`` is the
penultimate, globally average-pooled representation that the CFD loss
distils through.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["ResNet18", "SmallCNN", "build_classifier", "CLASSIFIERS"]


def _check_input(x: Tensor, in_channels: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"input must be a Tensor, got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"input must have shape [B, C, H, W], got shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(f"input must have {in_channels} channels, got shape {tuple(x.shape)}")


class BasicBlock(nn.Module):
    """ResNet basic block (two 3x3 conv-BN layers with a residual connection)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class _FeatureClassifier(nn.Module):
    """Shared head: ``forward`` returns the logits and the pooled features they come from."""

    fc: nn.Linear

    def forward_features(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Classify ``x`` (shape ``[B, 3, H, W]``, already normalised).

        Returns:
            ``(logits [B, num_classes], features [B, feature_dim])``.

        Raises:
            ValueError: If ``input`` does not have shape ``[B, in_channels, H, W]``.
        """
        feats = self.forward_features(x)
        return self.fc(feats), feats


class ResNet18(_FeatureClassifier):
    """CIFAR-style ResNet-18 returning ``(logits, features)``.

    3x3 stride-1 stem convolution without max-pooling, four stages of two
    :class:`BasicBlock` each (64, 128, 256, 512 channels), global average
    pooling and a linear head. About 11.2M parameters.

    Args:
        num_classes: Number of output classes.
        in_channels: Number of input image channels.

    Attributes:
        num_classes: Number of output classes.
        feature_dim: Dimension of the pooled features (512).

    Example:
        >>> model = ResNet18(num_classes=10).eval()
        >>> logits, feats = model(torch.randn(4, 3, 32, 32))
        >>> logits.shape, feats.shape
        (torch.Size([4, 10]), torch.Size([4, 512]))
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.feature_dim = 512
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        layers: list[nn.Module] = []
        in_planes = 64
        for planes, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers.append(
                nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes, 1))
            )
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled penultimate features of shape ``[B, 512]``."""
        _check_input(x, self.in_channels)
        h = self.stem(x)
        h = self.layer4(self.layer3(self.layer2(self.layer1(h))))
        return torch.flatten(self.pool(h), 1)


class SmallCNN(_FeatureClassifier):
    """Small, fast conv-BN-ReLU classifier returning ``(logits, features)``.

    Five 3x3 conv-BN-ReLU layers with widths ``width, width`` (32x32),
    ``2*width, 2*width`` (16x16) and ``4*width`` (8x8), max-pooling between
    stages, global average pooling and a linear head. With the default
    ``width=64`` it has about 0.56M parameters and is meant to be trained in a
    few epochs on CPU when a ResNet-18 is too slow.

    Args:
        num_classes: Number of output classes.
        width: Base channel width.
        in_channels: Number of input image channels.

    Attributes:
        num_classes: Number of output classes.
        feature_dim: Dimension of the pooled features (``4 * width``).

    Example:
        >>> model = SmallCNN(num_classes=10, width=32).eval()
        >>> logits, feats = model(torch.randn(4, 3, 32, 32))
        >>> feats.shape[1] == model.feature_dim == 128
        True
    """

    def __init__(self, num_classes: int = 10, width: int = 64, in_channels: int = 3) -> None:
        super().__init__()
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if width <= 0:
            raise ValueError(f"width must be positive, got {width}")
        self.num_classes = num_classes
        self.in_channels = in_channels
        self.width = width
        self.feature_dim = 4 * width

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w),
            *block(w, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: Tensor) -> Tensor:
        """Return the pooled penultimate features of shape ``[B, feature_dim]``."""
        _check_input(x, self.in_channels)
        return torch.flatten(self.pool(self.features(x)), 1)


CLASSIFIERS: dict[str, type[nn.Module]] = {"resnet18": ResNet18, "small_cnn": SmallCNN}


def build_classifier(name: str, **kwargs: Any) -> ResNet18 | SmallCNN:
    """Build a classifier by name.

    Args:
        name: One of ``"resnet18"`` or ``"small_cnn"`` (case-insensitive; ``-``
            is treated as ``_``).
        **kwargs: Forwarded to the classifier's constructor (e.g. ``num_classes``,
            ``width``).

    Returns:
        The classifier module.

    Raises:
        ValueError: If ``name`` is unknown.

    Example:
        >>> clf = build_classifier("small_cnn", num_classes=10, width=32)
        >>> clf.feature_dim
        128
    """
    key = name.lower().replace("-", "_") if isinstance(name, str) else name
    if key not in CLASSIFIERS:
        raise ValueError(f"unknown classifier {name!r}; allowed names: {sorted(CLASSIFIERS)}")
    model = CLASSIFIERS[key](**kwargs)
    assert isinstance(model, ResNet18 | SmallCNN)
    return model
