"""A frozen image classifier seen as ``images -> (logits, features)``, with an explicit input transform.

CFD distils through the classifier's penultimate pooled features ``f(x)`` (docs/method.md §3). Users
have classifiers in three forms, all accepted by :class:`FrozenClassifier`:

1. a module (or callable) returning ``(logits, features)``;
2. any ``nn.Module`` plus ``feature_layer``, the name of the sub-module whose output is the feature
   vector (read with a forward hook; a [B, C, H, W] output is global-average-pooled), e.g.
   ``"avgpool"`` of a torchvision ResNet or ``"global_pool"`` of a timm model;
3. a plain callable returning ``(logits, features)``.

The classifier is frozen: its parameters must not require gradients (``freeze=True`` turns them
off) and it always runs in eval mode. The input transform is explicit (pitfalls 3 and 4 of the
paper's code): map the diffusion range [-1, 1] to the classifier's range, normalise by mean/std,
resize bilinearly to the classifier's resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClassifierTransform", "FrozenClassifier"]


@dataclass(frozen=True)
class ClassifierTransform:
    """Maps generated images to a classifier's expected input.

    ``x -> resize((lerp(x, input_range -> output_range) - mean) / std, size)``.

    Attributes:
        input_range: Range of the images given (diffusion models: (-1, 1)).
        output_range: Range the classifier was trained on before normalisation (usually (0, 1)).
        mean: Per-channel mean for normalisation, or None.
        std: Per-channel std for normalisation, or None.
        size: Classifier resolution (int or (H, W)), or None to keep the size.
        align_corners: For the bilinear resize (the paper's code used True for 224x224).

    Example:
        >>> import torch
        >>> from kdiff import ClassifierTransform
        >>> tf = ClassifierTransform(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
        >>> tf(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
    """

    input_range: tuple[float, float] = (-1.0, 1.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    size: int | tuple[int, int] | None = None
    align_corners: bool = False

    def __post_init__(self) -> None:
        for name in ("input_range", "output_range"):
            lo, hi = getattr(self, name)
            if not lo < hi:
                raise ValueError(f"{name} must be (low, high) with low < high; got {(lo, hi)}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std must be > 0 per channel; got {tuple(self.std)}")
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if len(size) != 2 or any(not isinstance(s, int) or s < 1 for s in size):
                raise ValueError(f"size must be a positive int or (H, W); got {self.size!r}")

    def __call__(self, images: Tensor) -> Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, C, H, W]; got {tuple(images.shape)}")
        (a, b), (c, d) = self.input_range, self.output_range
        scale = (d - c) / (b - a)
        x = images * scale + (c - a * scale) if (a, b) != (c, d) else images
        if self.mean is not None and self.std is not None:
            if len(self.mean) != x.shape[1]:
                raise ValueError(
                    f"mean/std have {len(self.mean)} channels but images have {x.shape[1]}"
                )
            mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            inv_std = torch.tensor([1.0 / s for s in self.std], dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
            x = (x - mean) * inv_std
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else tuple(self.size)
            if tuple(x.shape[-2:]) != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)
        return x


class FrozenClassifier(nn.Module):
    """Wraps a frozen classifier as ``images -> (logits, features)``.

    Args:
        classifier: A module or callable returning ``(logits, features)``, or any ``nn.Module``
            returning logits when ``feature_layer`` is given.
        feature_layer: Name (as in ``named_modules()``) of the layer whose output is the feature
            vector; outputs with spatial dims are global-average-pooled to [B, D].
        transform: Input transform applied before the classifier (default: identity).
        freeze: Turn off ``requires_grad`` of the classifier's parameters. With ``freeze=False``
            a classifier with trainable parameters is refused.

    Example:
        >>> import torch
        >>> from kdiff import FrozenClassifier
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 10))
        >>> clf = FrozenClassifier(net, feature_layer="2")   # the ReLU's output is f(x)
        >>> logits, feats = clf(torch.randn(4, 3, 2, 2))
        >>> logits.shape, feats.shape
        (torch.Size([4, 10]), torch.Size([4, 8]))
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[Tensor], Any],
        *,
        feature_layer: str | None = None,
        transform: ClassifierTransform | Callable[[Tensor], Tensor] | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__()
        if not callable(classifier):
            raise TypeError(f"classifier must be an nn.Module or callable; got {type(classifier).__name__}")
        self._captured: list[Tensor] = []
        self._hook = None
        if isinstance(classifier, nn.Module):
            self.classifier: nn.Module | None = classifier
            self._callable: Callable[[Tensor], Any] = classifier
            trainable = [n for n, p in classifier.named_parameters() if p.requires_grad]
            if freeze:
                classifier.requires_grad_(False)
            elif trainable:
                raise ValueError(
                    "classifier must be frozen: parameters "
                    f"{', '.join(trainable[:3])}{'...' if len(trainable) > 3 else ''} require grad "
                    "(pass freeze=True or call classifier.requires_grad_(False))"
                )
            classifier.eval()
            if feature_layer is not None:
                modules = dict(classifier.named_modules())
                if feature_layer not in modules:
                    names = [n for n in modules if n][:12]
                    raise ValueError(
                        f"feature_layer {feature_layer!r} is not a sub-module of the classifier; "
                        f"some names it has: {names}"
                    )
                self._hook = modules[feature_layer].register_forward_hook(self._capture)
        else:
            if feature_layer is not None:
                raise ValueError("feature_layer needs the classifier to be an nn.Module")
            self.classifier = None
            self._callable = classifier
        self.feature_layer = feature_layer
        self.transform = transform

    def _capture(self, module: nn.Module, args: Any, output: Any) -> None:
        self._captured.append(output[0] if isinstance(output, (tuple, list)) else output)

    def train(self, mode: bool = True) -> FrozenClassifier:
        # The classifier stays in eval mode (BatchNorm statistics, no dropout) whatever the parent does.
        super().train(mode)
        if self.classifier is not None:
            self.classifier.eval()
        return self

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], features [B, D])`` of ``images`` (in the transform's input range)."""
        x = self.transform(images) if self.transform is not None else images
        if self.feature_layer is not None:
            self._captured.clear()
            logits = self._callable(x)
            if not self._captured:
                raise ValueError(f"feature_layer {self.feature_layer!r} did not run in the classifier's forward")
            features = self._captured[-1]
            self._captured.clear()
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
        else:
            out = self._callable(x)
            if not isinstance(out, (tuple, list)) or len(out) < 2:
                raise TypeError(
                    "classifier returned no features: it must return (logits, features), or pass "
                    "feature_layer=<name of the penultimate pooled layer>"
                )
            logits, features = out[0], out[1]
        if not isinstance(features, Tensor) or not isinstance(logits, Tensor):
            raise TypeError("classifier must produce tensors for logits and features")
        if features.ndim > 2:
            features = features.flatten(2).mean(-1)  # global average pooling
        if logits.ndim != 2 or features.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise ValueError(
                f"classifier must give logits [B, K] and features [B, D]; got {tuple(logits.shape)} "
                f"and {tuple(features.shape)}"
            )
        return logits, features
