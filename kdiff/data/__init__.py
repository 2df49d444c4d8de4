"""Datasets for kdiff: currently CIFAR-10 in the official python-pickle layout.

Example:
    >>> from kdiff.data import CIFAR10
    >>> images, labels = CIFAR10(train=True).tensors()  # doctest: +SKIP
"""

from kdiff.data.cifar10 import (
    BASE_FOLDER,
    CIFAR10,
    CIFAR10_CLASS_NAMES,
    CIFAR10_MD5,
    CIFAR10_URL,
    DATA_DIR_ENV_VAR,
    DatasetCorruptError,
    DatasetNotFoundError,
    default_data_root,
    download_cifar10,
    find_cifar10,
    from_model_range,
    load_cifar10_arrays,
    random_hflip,
    to_model_range,
)

__all__ = [
    "BASE_FOLDER",
    "CIFAR10",
    "CIFAR10_CLASS_NAMES",
    "CIFAR10_MD5",
    "CIFAR10_URL",
    "DATA_DIR_ENV_VAR",
    "DatasetCorruptError",
    "DatasetNotFoundError",
    "default_data_root",
    "download_cifar10",
    "find_cifar10",
    "from_model_range",
    "load_cifar10_arrays",
    "random_hflip",
    "to_model_range",
]
