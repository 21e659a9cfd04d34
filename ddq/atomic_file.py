"""Files replaced atomically (the checkpoints of `ddq.train` and `ddq.experiments`, the integer export of
DDQ_SPEC.md Section 5): a reader, or a resume after a crash, sees the old file or the new one, never a part."""

from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """write(handle) into a temporary file in path's folder, fsync it, rename it over path, fsync the folder;
    if anything fails, path is untouched and the temporary file removed."""
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
