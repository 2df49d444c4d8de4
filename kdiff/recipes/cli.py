"""Command line of the reference loops: ``kdiff-train {teacher,classifier,distill}``.

Every option is generated from the config dataclass (its help text is the field's), so the
command line and the Python API cannot drift apart. Start from a preset (``--preset paper`` or
``tiny``, or a JSON file with ``--config``), then override single fields::

    kdiff-train teacher --preset tiny --out-dir runs/teacher --steps 200
    kdiff-train classifier --preset tiny --out-dir runs/clf
    kdiff-train distill --preset tiny --teacher runs/teacher/teacher.safetensors \\
        --method cfd --classifier runs/clf/classifier.safetensors --out-dir runs/cfd
    torchrun --nproc_per_node=4 -m kdiff.recipes.cli distill --preset paper ...

``--print-config`` prints the resolved configuration as JSON and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kdiff.models.unet import UNetConfig

from .config import ClassifierConfig, DistillConfig, TeacherConfig, TrainConfig

__all__ = ["main", "build_parser", "config_from_args"]

_COMMANDS: dict[str, type[TrainConfig]] = {
    "teacher": TeacherConfig,
    "classifier": ClassifierConfig,
    "distill": DistillConfig,
}
_DESCRIPTIONS = {
    "teacher": "Train the base diffusion model (x-prediction, truncated-SNR loss, EMA, warmup, grad clip).",
    "classifier": "Train the frozen classifier used by CFD (SGD, step decay, crop/flip/Cutout).",
    "distill": "Distillation rounds N -> N/2 with the PD or the CFD objective (fresh Adam per round, cosine lr).",
}


def _none_or(kind: Any) -> Any:
    def parse(text: str) -> Any:
        return None if text.lower() in ("none", "null", "") else kind(text)

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def _tuple_of(kind: Any) -> Any:
    def parse(text: str) -> tuple[Any, ...]:
        return tuple(kind(v) for v in text.replace(" ", "").split(",") if v)

    parse.__name__ = f"comma-separated {kind.__name__}s"
    return parse


def _json_dict(text: str) -> dict[str, Any]:
    value = json.loads(text)
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _parser_for(annotation: Any) -> tuple[Any, bool]:
    """``(type callable, is_bool)`` for a field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is bool:
        return None, True
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        inner = next(a for a in args if a is not type(None))
        return _none_or(_parser_for(inner)[0]), False
    if origin is tuple:
        return _tuple_of(args[0]), False
    if origin is dict or annotation is dict:
        return _json_dict, False
    return annotation, False


def _unet_help() -> dict[str, str]:
    """Field descriptions from UNetConfig's docstring (its ``Attributes:`` section)."""
    doc = UNetConfig.__doc__ or ""
    out: dict[str, str] = {}
    current = None
    for line in doc.split("Attributes:", 1)[-1].splitlines():
        m = re.match(r"^\s{8}(\w+): (.*)$", line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current and line.startswith(" " * 12):
            out[current] += " " + line.strip()
        elif line.strip() == "" or re.match(r"^\s{4}\w", line):
            current = None if not line.strip() == "" else current
    return out


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return json.dumps(value)
    return "none" if value is None else str(value)


def _add_fields(parser: argparse.ArgumentParser, cls: type[Any], *, prefix: str = "",
                presets: dict[str, dict[str, Any]] | None = None) -> None:
    hints = typing.get_type_hints(cls)
    unet_help = _unet_help() if cls is UNetConfig else {}
    for f in dataclasses.fields(cls):
        annotation = hints[f.name]
        dest = prefix + f.name
        if annotation is UNetConfig:
            group = parser.add_argument_group("UNet architecture (fields of kdiff.models.UNetConfig)")
            sub = {k: v["unet"] for k, v in (presets or {}).items()}
            _add_fields(group, UNetConfig, prefix="unet_", presets=sub)  # type: ignore[arg-type]
            continue
        help_text = f.metadata.get("help") or unet_help.get(f.name, f"UNetConfig.{f.name}")
        if presets:
            shown = {k: _show(v[f.name]) for k, v in presets.items()}
            if len(set(shown.values())) == 1:
                help_text += f" [default: {shown['paper']}]"
            else:
                help_text += " [" + ", ".join(f"{k}: {v}" for k, v in shown.items()) + "]"
        kind, is_bool = _parser_for(annotation)
        if is_bool:
            parser.add_argument(_flag(dest), dest=dest, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS,
                                help=help_text)
        else:
            metavar = "JSON" if kind is _json_dict else dest.upper()
            parser.add_argument(_flag(dest), dest=dest, type=kind, default=argparse.SUPPRESS, metavar=metavar,
                                help=help_text.replace("%", "%%") if "%%" not in help_text else help_text)


def build_parser() -> argparse.ArgumentParser:
    """The ``kdiff-train`` argument parser (one sub-command per loop)."""
    parser = argparse.ArgumentParser(
        prog="kdiff-train",
        description="Reference training loops of kdiff. Run under torchrun for data parallelism; "
        "the global --batch-size is split evenly among the processes.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{teacher,classifier,distill}")
    for name, cls in _COMMANDS.items():
        p = sub.add_parser(name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name]
                           + " Values in brackets are the presets' defaults.")
        p.add_argument("--preset", choices=("paper", "tiny"), default="paper",
                       help="Starting values: the paper's settings or a CPU-sized smoke run [default: paper].")
        p.add_argument("--config", metavar="FILE", default=None,
                       help="JSON file with config fields (e.g. a run's config.json); applied after "
                       "the preset, before single options.")
        p.add_argument("--print-config", action="store_true",
                       help="Print the resolved configuration as JSON and exit.")
        _add_fields(p, cls, presets={"paper": cls.paper().to_dict(), "tiny": cls.tiny().to_dict()})
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The config a parsed command line describes (preset, then ``--config``, then options)."""
    cls = _COMMANDS[args.command]
    values: dict[str, Any] = {}
    if args.config:
        with open(args.config) as f:
            values.update(json.load(f))
    # Options not given are absent from ``args`` (argparse.SUPPRESS), so "none" can mean None.
    unet_over = {k[len("unet_"):]: v for k, v in vars(args).items() if k.startswith("unet_")}
    names = {f.name for f in dataclasses.fields(cls)}
    values.update({k: v for k, v in vars(args).items() if k in names})
    preset = getattr(cls, args.preset)
    if cls is TeacherConfig:
        base_unet = values.get("unet") or preset().unet
        if isinstance(base_unet, dict):
            base_unet = UNetConfig.from_dict(base_unet)
        if unet_over or "unet" in values:
            values["unet"] = dataclasses.replace(base_unet, **unet_over)
    if "unet" in values and isinstance(values["unet"], dict):
        values["unet"] = UNetConfig.from_dict(values["unet"])
    return preset(**values)


class _SetupError(Exception):
    """A problem found before any work starts; its message is one line for the user."""


def _check_out_dir(out_dir: str) -> None:
    """Create ``out_dir`` and a temporary file in it, so an unusable folder fails in seconds,
    not after the data is loaded and the model built."""
    path = Path(out_dir)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".kdiff-write-probe-"):
            pass
    except OSError as e:
        raise _SetupError(f"--out-dir {out_dir}: {e.strerror or e}") from None


def _data_not_found(e: Exception) -> str:
    # The loader's message lists every folder tried over several lines; its first line names
    # the split and the root, which is what a one-line error needs.
    first = (str(e).strip().splitlines() or ["CIFAR-10 not found"])[0].removesuffix(" Looked in:").rstrip(".")
    return f"{first}; pass --data-dir DIR (the folder holding cifar-10-batches-py) or set KDIFF_DATA_DIR"


def _check_data(config: TrainConfig) -> None:
    """The CIFAR-10 splits the loop will read must exist (only the files are looked for)."""
    if config.dataset != "cifar10":
        return
    from kdiff.data import DatasetNotFoundError, find_cifar10

    splits = [True]
    if isinstance(config, ClassifierConfig) and config.eval_samples:
        splits.append(False)  # the final accuracy reads the test split
    try:
        for train in splits:
            find_cifar10(config.data_dir, train=train)
    except DatasetNotFoundError as e:
        raise _SetupError(_data_not_found(e)) from None


def _error(message: str) -> int:
    print(f"kdiff-train: error: {message}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``kdiff-train`` and ``python -m kdiff.recipes.cli``.

    Returns 0 on success. Problems found before training (an invalid configuration, an
    ``--out-dir`` that cannot be created or written, missing CIFAR-10 files) and checkpoint or
    data errors during the run end with one ``kdiff-train: error: ...`` line on stderr and exit
    status 2.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except (ValueError, TypeError) as e:
        parser.error(f"invalid configuration: {e}")
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    try:
        _check_data(config)  # first: it creates nothing, so a refused run leaves no folder behind
        _check_out_dir(config.out_dir)
    except _SetupError as e:
        return _error(str(e))
    from kdiff.data import DatasetNotFoundError

    from . import train_classifier, train_distill, train_teacher

    run = {"teacher": train_teacher, "classifier": train_classifier, "distill": train_distill}[args.command]
    try:
        path = run(config)  # type: ignore[operator]
    except DatasetNotFoundError as e:
        return _error(_data_not_found(e))
    except (ValueError, FileNotFoundError) as e:  # CheckpointError, DatasetCorruptError, bad settings
        return _error(f"{args.command}: {e}")
    if os.environ.get("RANK", "0") == "0":
        print(f"kdiff-train {args.command}: wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
