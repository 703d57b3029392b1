"""Named fault points for the crash tests: ``SDS_EXP_FAULT=<point>[@<n>][:<SIGNAL>]`` kills the process there.

The job calls :func:`fault_point` at places where a crash is interesting (inside a stage, between the
files and the commit of a checkpoint). Without the variable a call is one dictionary lookup. ``@n`` fires
on the n-th time the point is reached (default 1); the signal defaults to SIGKILL.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["fault_point", "ENV"]

ENV = "SDS_EXP_FAULT"
_hits: Counter[str] = Counter()


def fault_point(name: str) -> None:
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, sig = spec, "SIGKILL"
    head, _, tail = spec.rpartition(":")
    if tail.startswith("SIG"):
        point, sig = head, tail
    point, _, nth = point.partition("@")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] == int(nth or 1):
        os.kill(os.getpid(), getattr(signal, sig))
