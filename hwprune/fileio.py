"""Atomic file writes: a reader (or a kill mid-write) never sees a half-written results file."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Union


def write_bytes_atomic(path: Union[str, Path], data: bytes) -> Path:
    """Write to a temporary file in the same folder, flush it to disk, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_text_atomic(path: Union[str, Path], text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))
