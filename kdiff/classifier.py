"""A frozen image classifier seen as ``images -> (logits, features)``, with an explicit input transform.

CFD distils through the classifier's penultimate pooled features ``f(x)`` (docs/method.md §3). Any
classifier can guide it; :class:`FrozenClassifier` reads ``f(x)`` from:

1. a module (or callable) returning ``(logits, features)``;
2. any ``nn.Module`` plus ``feature_layer``, the name of the sub-module whose output is the feature
   vector (read with a forward hook; a [B, C, H, W] output is global-average-pooled), e.g.
   ``"avgpool"`` of a torchvision ResNet;
3. a timm model, ``features="timm"``: ``forward_features`` then ``forward_head(pre_logits=True)``;
4. the logits themselves, ``features="logits"``, for a classifier that exposes nothing else.

:class:`FrozenClassifier` is the one owner of the classifier's input transform
(:class:`ClassifierTransform`). Its default maps the diffusion range [-1, 1] to [0, 1], the input
range of classifiers trained on [0, 1] images (torchvision's, kdiff's own), and bounds the images to
that range; the paper fed raw, unbounded [-1, 1] images, which is
``ClassifierTransform(output_range=(-1, 1), clamp=False)``.
"""

from __future__ import annotations

import difflib
import inspect
import re
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import einops
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from ._validation import _is_finite_real

__all__ = ["ClassifierTransform", "FrozenClassifier"]


def _float_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        lo, hi = value
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be (low, high); got {value!r}") from None
    if not (_is_finite_real(lo) and _is_finite_real(hi)) or not lo < hi:
        raise ValueError(f"{name} must be (low, high) of finite numbers with low < high; got {value!r}")
    return float(lo), float(hi)


def _float_tuple(name: str, value: Any) -> tuple[float, ...]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty sequence of per-channel numbers; got {value!r}")
    if not all(_is_finite_real(v) for v in value):
        raise ValueError(f"{name} must hold finite numbers; got {tuple(value)!r}")
    return tuple(float(v) for v in value)


# Normalisation constants per (mean, std, device, dtype). Building them from Python floats at each
# call copies from the host, which on an accelerator blocks the host (a sync every step) and cannot
# run inside a CUDA graph capture.
_NORM_CONSTANTS: dict[tuple[Any, ...], tuple[Tensor, Tensor]] = {}


def _norm_constants(mean: tuple[float, ...], std: tuple[float, ...], like: Tensor) -> tuple[Tensor, Tensor]:
    """``(mean, 1 / std)`` as [1, C, 1, 1] tensors on ``like``'s device and dtype."""

    def build() -> tuple[Tensor, Tensor]:
        m = torch.tensor(mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        inv = torch.tensor([1.0 / s for s in std], dtype=like.dtype, device=like.device).view(1, -1, 1, 1)
        return m, inv

    if torch.compiler.is_compiling():
        return build()  # graph constants; nothing to cache while tracing
    key = (mean, std, like.device, like.dtype)
    if key not in _NORM_CONSTANTS:
        # Plain tensors even when first built under inference_mode: a later training step saves
        # 1 / std for backward, which an inference tensor cannot be.
        with torch.inference_mode(False), torch.no_grad():
            _NORM_CONSTANTS[key] = build()
    return _NORM_CONSTANTS[key]


@dataclass(frozen=True)
class ClassifierTransform:
    """Maps generated images to a classifier's expected input.

    ``x -> resize((clamp(lerp(x, input_range -> output_range)) - mean) / std, size)``. The default,
    ``ClassifierTransform()``, maps [-1, 1] to [0, 1], bounds the result to [0, 1] and does nothing
    else: the convention of classifiers trained on [0, 1] images (torchvision's, kdiff's own). The
    paper fed the raw, unbounded [-1, 1] images to its classifiers: that is
    ``ClassifierTransform(output_range=(-1, 1), clamp=False)`` (add ``size=224,
    align_corners=True`` for its ImageNet classifiers).

    The bound (``clamp=True``, the default) is where kdiff keeps the classifier inside the range
    it was trained on, for CFD losses and evaluation alike: a student's x-prediction
    ``x_hat = (z_t - sigma_t eps_hat) / alpha_t`` of an eps-network reaches +-100 where
    ``alpha_t`` is about 0 (the top of DDPM's linear betas), and a classifier fed such images
    gives saturated features that swamp the loss. Clamping the mapped image to ``output_range`` is
    clamping ``x`` to ``input_range``: where ``x`` is inside, values and gradients are those of the
    unbounded transform exactly; a pixel outside gets zero gradient (``torch.clamp``), since
    moving it does not change what the classifier sees (a straight-through bound would pass it
    the boundary's gradient, which can push it further out with no effect on the loss). Sampling
    with ``clip_x=True`` then uses the same bounded image the classifier scored.

    uint8 images are read as [0, 255] (mapped to ``output_range``), so saved samples and dataset
    images go through the same function as generated float images.

    Attributes:
        input_range: Range of the float images given (diffusion models: (-1, 1)).
        output_range: Range the classifier was trained on before normalisation (usually (0, 1)).
        mean: Per-channel mean for normalisation, or None.
        std: Per-channel std for normalisation (each > 0), or None.
        size: Classifier resolution (int or (H, W)), or None to keep the size.
        align_corners: For the bilinear resize (the paper's code used True for 224x224).
        clamp: Bound the mapped images to ``output_range`` before normalising (default True);
            False feeds out-of-range images through unchanged, as the paper did.

    Example:
        >>> import torch
        >>> from kdiff import ClassifierTransform
        >>> tf = ClassifierTransform(mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
        >>> tf(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 3, 32, 32])
        >>> float(ClassifierTransform()(torch.full((1, 3, 2, 2), 100.0)).max())   # bounded
        1.0
        >>> paper = ClassifierTransform(output_range=(-1, 1), clamp=False)   # raw images, as in the paper
        >>> bool((paper(torch.full((1, 3, 4, 4), 5.0)) == 5).all())
        True
    """

    input_range: tuple[float, float] = (-1.0, 1.0)
    output_range: tuple[float, float] = (0.0, 1.0)
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    size: int | tuple[int, int] | None = None
    align_corners: bool = False
    clamp: bool = True

    def __post_init__(self) -> None:
        # Stored as tuples of floats, so transforms built from lists (e.g. JSON metadata) compare
        # and hash equal to those built from tuples.
        for name in ("input_range", "output_range"):
            object.__setattr__(self, name, _float_pair(name, getattr(self, name)))
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std must be given together")
        if self.mean is not None and self.std is not None:
            mean, std = _float_tuple("mean", self.mean), _float_tuple("std", self.std)
            if len(mean) != len(std):
                raise ValueError(f"mean and std must have one value per channel each; got {len(mean)} and {len(std)}")
            if any(s <= 0 for s in std):
                raise ValueError(f"std must be > 0 per channel; got {std}")
            object.__setattr__(self, "mean", mean)
            object.__setattr__(self, "std", std)
        if self.size is not None:
            size = (self.size, self.size) if isinstance(self.size, int) else self.size
            ok = isinstance(size, Sequence) and len(size) == 2 and all(
                isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in size
            )
            if not ok:
                raise ValueError(f"size must be a positive int or (H, W); got {self.size!r}")
            object.__setattr__(self, "size", tuple(size))
        for name in ("align_corners", "clamp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False; got {getattr(self, name)!r}")

    @property
    def channels(self) -> int | None:
        """Number of channels ``mean``/``std`` fix, or None without normalisation."""
        return None if self.mean is None else len(self.mean)

    def __call__(self, images: Tensor) -> Tensor:
        """The classifier's input for ``images`` ([B, C, H, W], float in ``input_range`` or uint8)."""
        if not isinstance(images, Tensor):
            raise TypeError(f"images must be a torch.Tensor; got {type(images).__name__}")
        if images.ndim != 4:
            raise ValueError(f"images must have shape [B, C, H, W]; got {tuple(images.shape)}")
        if self.channels is not None and images.shape[1] != self.channels:
            raise ValueError(
                f"images must have {self.channels} channels (one per mean/std value); got "
                f"{images.shape[1]} (shape {tuple(images.shape)})"
            )
        (c, d) = self.output_range
        if images.dtype == torch.uint8:
            a, b = 0.0, 255.0
            images = images.float()
        elif images.is_floating_point():
            a, b = self.input_range
        else:
            raise TypeError(f"images must be a float tensor (or uint8); got {images.dtype}")
        scale = (d - c) / (b - a)
        x = images * scale + (c - a * scale) if (a, b) != (c, d) else images
        if self.clamp:
            x = x.clamp(c, d)
        if self.mean is not None and self.std is not None:
            mean, inv_std = _norm_constants(tuple(self.mean), tuple(self.std), x)
            x = (x - mean) * inv_std
        if self.size is not None and tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=self.align_corners)
        return x

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable record of the transform (for evaluation protocols and cache keys)."""
        return {
            "input_range": list(self.input_range),
            "uint8_range": [0, 255],
            "output_range": list(self.output_range),
            "clamp": self.clamp,
            "mean": None if self.mean is None else list(self.mean),
            "std": None if self.std is None else list(self.std),
            "size": None if self.size is None else list(self.size),  # type: ignore[arg-type]
            "resize": "bilinear" + (" align_corners" if self.align_corners else ""),
        }


# Names that usually hold the pooled penultimate features (or the layer right after them).
_FEATURE_LAYER_HINT = re.compile(r"pool|flatten|penultimate|global|head|fc|classifier|features?$", re.I)


def _feature_layer_error(feature_layer: str, classifier: nn.Module) -> ValueError:
    modules = [(n, m) for n, m in classifier.named_modules() if n]
    names = [n for n, _ in modules]
    top = [n for n, _ in classifier.named_children()]
    # By name (``avgpool``, ``global_pool``, ``fc``) or by type (the digits of an nn.Sequential).
    likely = [
        f"{n} ({type(m).__name__})"
        for n, m in modules
        if _FEATURE_LAYER_HINT.search(n.rsplit(".", 1)[-1]) or _FEATURE_LAYER_HINT.search(type(m).__name__)
    ]
    close = difflib.get_close_matches(feature_layer, names, n=3, cutoff=0.5)
    parts = [f"feature_layer {feature_layer!r} is not a sub-module of the classifier"]
    if close:
        parts.append(f"did you mean {' or '.join(map(repr, close))}?")
    parts.append(f"top-level modules: {top}")
    if likely:
        parts.append(f"pooling/penultimate-looking modules: {', '.join(likely[:20])}")
    return ValueError("; ".join(parts) + " (names as in classifier.named_modules())")


def _first_layer_channels(classifier: nn.Module) -> tuple[str, int] | None:
    """``(name, in_channels)`` when the first layer with parameters is a Conv2d, else None."""
    for name, module in classifier.named_modules():
        if isinstance(module, nn.Conv2d) and not isinstance(module, nn.modules.lazy.LazyModuleMixin):
            return name, module.in_channels
        if next(module.parameters(recurse=False), None) is not None:
            return None
    return None


class _CaptureHook:
    """Forward hook recording a layer's output into its FrozenClassifier while that wrapper's
    forward runs.

    It holds the wrapper weakly, so it never keeps the wrapper (or tensors) alive; copies and
    pickles of it are dead (record nothing), and a copied wrapper attaches a fresh one.
    """

    def __init__(self, owner: FrozenClassifier | None) -> None:
        self.owner = None if owner is None else weakref.ref(owner)

    def dead(self) -> bool:
        return self.owner is None or self.owner() is None

    def __call__(self, module: nn.Module, args: Any, output: Any) -> None:
        wrapper = None if self.owner is None else self.owner()
        if wrapper is not None and wrapper._slot is not None:
            wrapper._slot.append(output[0] if isinstance(output, (tuple, list)) else output)

    def __reduce__(self) -> tuple[type, tuple[None]]:
        return (_CaptureHook, (None,))


_FEATURE_SOURCES: tuple[str, ...] = ("timm", "logits")


def _accepts_keyword(fn: Callable[..., Any], name: str) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # no signature to read (a builtin): let the call decide
        return True
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class _ClassifierCall(nn.Module):
    """The classifier's own forward for one feature source.

    :class:`FrozenClassifier` runs it through ``torch.func.functional_call`` with detached copies
    of the parameters that require grad, so timm's two-method forward gets the same treatment as
    ``forward``. It is not a registered sub-module of the wrapper (the classifier is, once).
    """

    def __init__(self, net: nn.Module, features: str | None) -> None:
        super().__init__()
        self.net = net
        self.features = features

    def forward(self, x: Tensor) -> Any:
        if self.features == "timm":
            h = self.net.forward_features(x)
            return self.net.forward_head(h), self.net.forward_head(h, pre_logits=True)
        return self.net(x)


class FrozenClassifier(nn.Module):
    """Wraps a frozen classifier as ``images -> (logits, features)``, with its input transform.

    The wrapper owns the input transform: ``transform=None`` means ``ClassifierTransform()``,
    which maps [-1, 1] to [0, 1] and bounds the images to that range (classifiers trained on
    [0, 1] images); pass ``ClassifierTransform(output_range=(-1, 1), clamp=False)`` for the
    paper's setting (raw [-1, 1] images), or a transform with the classifier's
    ``mean``/``std``/``size``. A plain callable transform is used as given (bound the images in
    it if the classifier needs that).

    Where the features come from (``f(x)``, docs/method.md §3):

    * default: the classifier returns ``(logits, features)``;
    * ``feature_layer="name"``: the output of that sub-module (as in ``named_modules()``), read by
      a forward hook, e.g. ``"avgpool"`` of a torchvision ResNet (the pooled input of ``fc``);
    * ``features="timm"``: a timm model's ``forward_head(forward_features(x), pre_logits=True)``
      (the pooled input of its classifier head), logits from ``forward_head(...)``;
    * ``features="logits"``: the logits themselves, for a classifier that exposes nothing else
      (the feature KL then matches tempered class distributions).

    Outputs with spatial dims ([B, C, H, W]) are global-average-pooled to [B, C].

    The wrapper leaves your module as you gave it: parameters keep their ``requires_grad`` and the
    module keeps its train/eval mode. For the duration of each call, sub-modules in training mode
    are switched to eval mode (BatchNorm statistics, no dropout) and back, and parameters that
    require grad are replaced by detached views (``torch.func.functional_call``), so gradients
    reach the images but no weight gradient is computed or written to ``.grad``. ``.train()`` or
    ``.eval()`` on the wrapper or a parent does not change the classifier's mode. As for any
    sub-module, a parent's ``.to(...)`` moves it and a parent's ``state_dict()`` holds its
    weights. With ``feature_layer``, a forward hook stays registered on that layer while the
    wrapper lives; it records only while this wrapper's own forward runs (calling the classifier
    directly, or through another wrapper, records nothing here), and goes with :meth:`remove` (or
    on leaving a ``with`` block) or when the wrapper is garbage-collected. Plain callables are
    called as given.

    When the classifier's first layer with parameters is an ``nn.Conv2d``, the transformed
    images must have its ``in_channels`` (a ``ValueError`` names both counts).

    Args:
        classifier: A module or callable returning ``(logits, features)``, or any ``nn.Module``
            returning logits with ``feature_layer`` or ``features``.
        feature_layer: Name (as in ``named_modules()``) of the layer whose output is the feature
            vector.
        features: ``"timm"`` or ``"logits"`` (see above), or None (default) for the classifier's
            ``(logits, features)`` output or ``feature_layer``. Not both with ``feature_layer``.
        transform: The input transform (default ``ClassifierTransform()``: [-1, 1] -> [0, 1],
            bounded).

    Raises:
        TypeError: ``classifier`` is not callable, or ``features="timm"`` without timm's
            ``forward_features``/``forward_head(..., pre_logits=...)``.
        ValueError: An unknown ``feature_layer`` (the message lists likely layers) or
            ``features`` value, or both given.

    Example:
        >>> import torch
        >>> from kdiff import ClassifierTransform, FrozenClassifier
        >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8), torch.nn.ReLU(),
        ...                           torch.nn.Linear(8, 10))
        >>> with FrozenClassifier(net, feature_layer="2") as clf:   # the ReLU's output is f(x)
        ...     logits, feats = clf(torch.randn(4, 3, 2, 2))
        >>> logits.shape, feats.shape
        (torch.Size([4, 10]), torch.Size([4, 8]))
        >>> net.training, net[1].weight.requires_grad                # left as given
        (True, True)
        >>> by_logits = FrozenClassifier(net, features="logits")    # f(x) = the 10 logits
        >>> paper = FrozenClassifier(net, feature_layer="2",
        ...                          transform=ClassifierTransform(output_range=(-1, 1), clamp=False))
    """

    def __init__(
        self,
        classifier: nn.Module | Callable[[Tensor], Any],
        *,
        feature_layer: str | None = None,
        features: str | None = None,
        transform: ClassifierTransform | Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not callable(classifier):
            raise TypeError(f"classifier must be an nn.Module or callable; got {type(classifier).__name__}")
        if transform is not None and not callable(transform):
            raise TypeError(f"transform must be a ClassifierTransform or callable; got {type(transform).__name__}")
        if feature_layer is not None and not isinstance(feature_layer, str):
            raise TypeError(f"feature_layer must be a module name (str); got {type(feature_layer).__name__}")
        if features is not None and features not in _FEATURE_SOURCES:
            raise ValueError(
                f"features must be None, {' or '.join(map(repr, _FEATURE_SOURCES))}; got {features!r} "
                "(a layer of the classifier is given with feature_layer=<name>)"
            )
        if features is not None and feature_layer is not None:
            raise ValueError(
                f"give feature_layer or features, not both; got feature_layer={feature_layer!r} and "
                f"features={features!r}"
            )
        if features == "timm":
            missing = [n for n in ("forward_features", "forward_head") if not callable(getattr(classifier, n, None))]
            if not isinstance(classifier, nn.Module) or missing:
                raise TypeError(
                    'features="timm" needs an nn.Module with forward_features(x) and '
                    f"forward_head(x, pre_logits=...) (timm's API); {type(classifier).__name__} lacks "
                    f"{' and '.join(missing) or 'nn.Module'}"
                )
            if not _accepts_keyword(classifier.forward_head, "pre_logits"):  # type: ignore[union-attr]
                raise TypeError('features="timm" needs forward_head(x, pre_logits=True) (timm\'s API)')
        self._slot: list[Tensor] | None = None
        self._detach: weakref.finalize | None = None
        self._hooked = False
        self._first_layer: tuple[str, int] | None = None
        if isinstance(classifier, nn.Module):
            layer = None
            if feature_layer is not None:
                layer = dict(classifier.named_modules()).get(feature_layer)
                if layer is None:
                    raise _feature_layer_error(feature_layer, classifier)
            self.classifier: nn.Module | None = classifier
            self._fn: Callable[[Tensor], Any] | None = None
            # Not registered (the classifier already is): it shares the classifier, it does not own it.
            object.__setattr__(self, "_run", _ClassifierCall(classifier, features))
            self._first_layer = _first_layer_channels(classifier)
            if layer is not None:
                self._attach(layer)
        else:
            if feature_layer is not None:
                raise ValueError("feature_layer needs the classifier to be an nn.Module")
            self.classifier = None
            self._fn = classifier
        self.feature_layer = feature_layer
        self.features = features
        self.transform: ClassifierTransform | Callable[[Tensor], Tensor] = (
            ClassifierTransform() if transform is None else transform
        )

    def _attach(self, layer: nn.Module) -> None:
        # Drop dead hooks first: those copied along with a deep-copied or unpickled classifier.
        for key, hook in list(layer._forward_hooks.items()):
            if isinstance(hook, _CaptureHook) and hook.dead():
                del layer._forward_hooks[key]
        handle = layer.register_forward_hook(_CaptureHook(self))
        # Removes the hook when the wrapper is garbage-collected (the hook holds it weakly).
        self._detach = weakref.finalize(self, handle.remove)
        self._hooked = True

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_detach=None, _slot=None)  # a finaliser belongs to this object only
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if self._hooked and self.classifier is not None and self.feature_layer is not None:
            self._attach(self.classifier.get_submodule(self.feature_layer))

    def remove(self) -> None:
        """Remove the ``feature_layer`` hook from the classifier (idempotent).

        The wrapper cannot be called afterwards; a classifier without ``feature_layer`` has no
        hook and is unaffected.
        """
        if self._detach is not None:
            self._detach()
        self._hooked = False

    def __enter__(self) -> FrozenClassifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def train(self, mode: bool = True) -> FrozenClassifier:
        # The classifier's mode is its owner's: its forward runs in eval mode whatever it is.
        if not isinstance(mode, bool):
            raise ValueError(f"training mode is expected to be boolean; got {mode!r}")
        self.training = mode
        for child in self.children():
            if child is not self.classifier:
                child.train(mode)
        return self

    def _call(self, x: Tensor) -> Any:
        if self.classifier is None:
            return self._fn(x)  # type: ignore[misc]
        # Eval mode for this call only; the owner's flags come back afterwards, even on error.
        switched = [m for m in self.classifier.modules() if m.training]
        for m in switched:
            m.training = False
        try:
            # Detached views of trainable weights: gradients reach x, never the weights.
            detached = {f"net.{n}": p.detach() for n, p in self.classifier.named_parameters() if p.requires_grad}
            if detached:
                return functional_call(self._run, detached, (x,))
            return self._run(x)
        finally:
            for m in switched:
                m.training = True

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits [B, K], features [B, D])`` of ``images`` (in the transform's input range)."""
        x = self.transform(images)
        if self._first_layer is not None and isinstance(x, Tensor) and x.ndim == 4:
            name, channels = self._first_layer
            if x.shape[1] != channels:
                raise ValueError(
                    f"images have {x.shape[1]} channels (shape {tuple(x.shape)} after the transform) "
                    f"but the classifier's first layer {name!r} expects {channels}"
                )
        if self.feature_layer is not None:
            if not self._hooked:
                raise RuntimeError("this FrozenClassifier's feature_layer hook was removed; wrap the classifier again")
            slot: list[Tensor] = []
            self._slot = slot
            try:
                logits = self._call(x)
            finally:
                self._slot = None
            if not slot:
                raise ValueError(f"feature_layer {self.feature_layer!r} did not run in the classifier's forward")
            features = slot[-1]  # the last call, for a layer used more than once
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
        elif self.features == "logits":
            logits = self._call(x)
            if isinstance(logits, (tuple, list)):
                logits = logits[0]
            features = logits
        else:
            out = self._call(x)
            if not isinstance(out, (tuple, list)) or len(out) < 2:
                raise TypeError(
                    "classifier returned no features: it must return (logits, features), or pass "
                    "feature_layer=<name of the penultimate pooled layer>, features='timm' (a timm "
                    "model) or features='logits'"
                )
            logits, features = out[0], out[1]
        if not isinstance(features, Tensor) or not isinstance(logits, Tensor):
            raise TypeError("classifier must produce tensors for logits and features")
        if features.ndim > 2:
            features = einops.reduce(features, "b c ... -> b c", "mean")  # global average pooling
        if logits.ndim != 2 or features.ndim != 2 or features.shape[0] != logits.shape[0]:
            raise ValueError(
                f"classifier must give logits [B, K] and features [B, D]; got {tuple(logits.shape)} "
                f"and {tuple(features.shape)}"
            )
        return logits, features

    def extra_repr(self) -> str:
        return f"feature_layer={self.feature_layer!r}, features={self.features!r}, transform={self.transform!r}"
