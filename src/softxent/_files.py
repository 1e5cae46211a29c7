"""Writing files so that a crash never leaves half of one: a temporary file beside the target, a rename."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path in ``path``'s directory; rename it onto ``path`` when the block succeeds,
    delete it when the block raises, so that ``path`` is never half written."""
    target = Path(path)
    tmp = str(target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Created with open() rather than mkstemp so that the file gets the umask's permissions, not 0600.
    with open(tmp, "x"):
        pass
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
