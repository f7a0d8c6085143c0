"""Every output file is written whole or not at all: written to a temporary file beside it, flushed to disk, then
renamed over the target in one step (``os.replace``). A kill mid-write leaves the previous file (or none), never a
truncated one; a reader sees the old file or the new one."""
from __future__ import annotations

import contextlib
import os
import threading
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """Yield a temporary path (same directory and suffix, so writers that infer the format from the name work);
    when the block succeeds it replaces ``path``, otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}-{threading.get_ident()}{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb+") as f:  # on disk before the rename: a crash cannot leave a renamed empty file
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_text(path: Union[str, Path], text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)
