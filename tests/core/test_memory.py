"""The up-front memory check: needs against this machine's real memory."""

from __future__ import annotations

import os

import pytest
import torch

from bagssl_core.config import ConfigError
from bagssl_core.memory import Need, human_bytes, memory_limit, require_memory

CPU = torch.device("cpu")


def test_the_limit_is_at_most_the_physical_memory() -> None:
    limit, where = memory_limit(CPU)
    assert 0 < limit <= os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert where == "this machine"


def test_needs_within_the_limit_pass_and_beyond_it_name_the_largest_first() -> None:
    limit, _ = memory_limit(CPU)
    small = Need("a small tensor", 1024, "a.small", "less of a.small")
    require_memory([small, Need("half", limit // 2, "a.half", "less of a.half")], CPU)
    big = Need("a big tensor", limit, "a.big", "less of a.big")
    with pytest.raises(ConfigError) as err:
        require_memory([small, big], CPU)  # together just over the limit
    message = str(err.value)
    assert message.startswith(f"a.big: this run needs at least {human_bytes(limit + 1024)} at once")
    assert message.index("a big tensor") < message.index("a small tensor")
    assert message.endswith("; expected less of a.big")


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB"), (2**60, "1024.0 PiB")],
)
def test_human_bytes(n: int, text: str) -> None:
    assert human_bytes(n) == text
