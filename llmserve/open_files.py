"""The process's open-file limit against its connection limits (router and worker entry points).

Every connection holds a file descriptor. Many systems start a process with a soft limit of
1,024 descriptors, far below ``--max-grpc-connections`` + ``--max-http-connections``: past it,
accept fails, and so does every connection the process makes itself (Redis, workers, model
files), while the connection limits never trigger. The entry points raise the soft limit to
what their limits need (never above the hard limit the system allows, never lower than it is)
and warn when the hard limit is too low.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

# Descriptors beside the counted connections: Redis, channels to workers, the metrics port,
# model and tokenizer files, torch's and the interpreter's own.
SPARE_FILES = 1024


def raise_open_file_limit(connections: int) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``connections`` + :data:`SPARE_FILES` if it is lower
    and the hard limit allows; returns the soft limit in force after. A hard limit below that is
    logged as a warning naming the flags."""
    try:
        import resource
    except ImportError:  # not a POSIX system: nothing to raise
        return -1
    need = connections + SPARE_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        if target > soft:
            try:
                resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
                soft = target
            except (ValueError, OSError) as exc:
                log.warning("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
        if soft < need:
            log.warning(
                "the open-file limit is %d (hard limit %s), below the %d that the connection limits "
                "need (--max-grpc-connections, --max-http-connections, plus %d): raise the nofile "
                "ulimit or lower those limits", soft, hard, need, SPARE_FILES)
    return soft
