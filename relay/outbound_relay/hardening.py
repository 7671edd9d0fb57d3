"""Process hardening at start-up: no core dumps, no same-user inspection. Standard library only, so the
operator (and the Lua worker process) can call it too.

A core dump of the relay or the operator would hold every password, token and private key in memory,
written to disk or handed to a crash collector. `RLIMIT_CORE` 0 stops a core file, but the kernel still
pipes a dump to a `core_pattern` helper (core(5)); `PR_SET_DUMPABLE` 0 stops both, and also makes the
process's /proc entries root-owned: another process of the same user can then neither ptrace it nor
read its `/proc/<pid>/environ`, `mem` or `maps` (prctl(2)).
"""

from __future__ import annotations

import ctypes
import logging
import resource
import sys
from typing import Final

log = logging.getLogger(__name__)

PR_SET_DUMPABLE: Final = 4  # <linux/prctl.h>


def disable_core_dumps() -> None:
    """Set the core size limit to 0 (soft and hard: the process cannot raise it back) and, on Linux,
    mark the process not dumpable. A failure is logged, never fatal: the relay still works without."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    except (OSError, ValueError) as error:
        log.warning("could not set the core file size limit to 0: %s", error)
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)  # the interpreter's own symbols include libc's
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("prctl(PR_SET_DUMPABLE, 0) failed: errno %d", ctypes.get_errno())
