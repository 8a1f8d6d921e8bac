"""Up-front memory checks: the tensors a config asks for, against the memory of the device that holds them.

A size with no fixed upper bound (`data.image_size=100000`, `patch.num=1000000`, a projector a million
wide) used to end in torch's "can't allocate memory" traceback, after the data had loaded. Each check
here adds up tensors the run cannot avoid holding at once: a lower bound on what it needs, never an
estimate of its peak. So a refused config could never have run on that device, and one that passes may
still run out of memory later, for the activations no check counts.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bagssl_core.config import ConfigError

if TYPE_CHECKING:  # torch is imported only to ask a GPU its size: the sweep driver imports this module
    import torch

# cgroup v1 and v2 files holding the memory limit of this process's container; "max" or a number near 2**63
# means none. A container's limit is what the kernel's OOM killer enforces, whatever the host has.
_CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"), Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))


class MemoryExceeded(ConfigError):
    """A config whose own tensors exceed the memory of the device that runs it: bad input for a command
    (exit 2), but in a sweep one trial's failure, not the spec's, since another machine or another trial's
    values may fit."""


@dataclass(frozen=True)
class Need:
    """Memory a run must hold at once.

    Attributes:
        what: the tensors, with the knobs' values that size them, for the message.
        nbytes: their size.
        keys: the knobs that size them, to start the message with when this need is the largest.
        expected: what to change, for the message.
    """

    what: str
    nbytes: int
    keys: str
    expected: str


def memory_limit(device: torch.device) -> tuple[int, str]:
    """Bytes of memory on `device`, and how to name it: a GPU's total memory, else the machine's physical
    memory or its container's limit, whichever is smaller."""
    if device.type == "cuda":
        import torch

        props = torch.cuda.get_device_properties(device)
        return props.total_memory, f"GPU {device.index or 0} ({props.name})"
    limit = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in _CGROUP_LIMITS:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            limit = min(limit, int(text))
    return limit, "this machine"


def require_memory(needs: Sequence[Need], device: torch.device) -> None:
    """MemoryExceeded when `needs` together exceed `device`'s memory, starting with the largest need's knobs.

    The message lists every need, largest first, so that the knob to change is plain."""
    total = sum(n.nbytes for n in needs)
    limit, where = memory_limit(device)
    if total <= limit:
        return
    ordered = sorted(needs, key=lambda n: -n.nbytes)
    parts = "; ".join(f"{human_bytes(n.nbytes)} for {n.what}" for n in ordered)
    raise MemoryExceeded(
        f"{ordered[0].keys}: this run needs at least {human_bytes(total)} at once, more than the "
        f"{human_bytes(limit)} of memory {where} has: {parts}; expected {ordered[0].expected}"
    )


def human_bytes(n: float) -> str:
    """1536 -> "1.5 KiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
