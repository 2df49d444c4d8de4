"""Files on disk: crash-safe weights and training state, and the SHA-256 helpers they rely on.

See ``docs/data_and_checkpoints.md``.
"""

from kdiff.io.hashing import hash_images, sha256_file, sha256_state_dict
from kdiff.io.store import (
    FORMAT_VERSION,
    RESERVED_KEYS,
    CheckpointError,
    atomic_write_bytes,
    load_state_dict_strict,
    load_training_state,
    load_weights,
    save_training_state,
    save_weights,
)

__all__ = [
    "FORMAT_VERSION", "RESERVED_KEYS", "CheckpointError", "atomic_write_bytes", "hash_images",
    "load_state_dict_strict", "load_training_state", "load_weights", "save_training_state",
    "save_weights", "sha256_file", "sha256_state_dict",
]
