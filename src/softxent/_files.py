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
    delete it when the block raises, so that ``path`` is never half written.

    An OSError about the temporary file (creating, writing, renaming it) names ``path`` instead, so that
    messages never show the hidden temporary name.
    """
    target = Path(path)
    tmp = str(target.parent / f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    # Created with open() rather than mkstemp so that the file gets the umask's permissions, not 0600.
    try:
        with open(tmp, "x"):
            pass
    except OSError as error:
        raise _naming(error, target) from None
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(error, OSError) and tmp in (error.filename, error.filename2):
            raise _naming(error, target) from None
        raise


def _naming(error: OSError, target: Path) -> OSError:
    """``error`` (same type, errno and reason) about ``target`` instead of the temporary file."""
    if error.errno is None:
        return error
    return type(error)(error.errno, error.strerror, str(target))
