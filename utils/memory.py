"""Process memory settings."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)
M_ARENA_MAX = -8  # glibc mallopt parameter


def limit_malloc_arenas(arenas: int = 2) -> None:
    """Cap glibc's malloc arenas: by default each busy thread (request workers, batchers) may get its own arena,
    and on a 2-core machine under load the resident memory grows by hundreds of MB without any leak."""
    library = ctypes.util.find_library("c")
    if library is None:
        return
    try:
        if ctypes.CDLL(library).mallopt(M_ARENA_MAX, arenas) != 1:
            logger.debug("mallopt(M_ARENA_MAX) was refused")
    except (OSError, AttributeError):  # not glibc
        pass
