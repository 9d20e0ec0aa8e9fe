import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _cluster import Cluster  # noqa: E402


class _Pools:
    """One worker pool per world size for the whole session (started on first use)."""

    def __init__(self):
        self.pools = {}

    def get(self, world: int) -> Cluster:
        pool = self.pools.get(world)
        if pool is not None and pool.dead:
            pool.close(timeout=2)
            pool = None
        if pool is None:
            pool = Cluster(world)
            self.pools[world] = pool
        return pool

    def close(self):
        for p in self.pools.values():
            p.close()
        self.pools.clear()


@pytest.fixture(scope="session")
def pools():
    p = _Pools()
    yield p
    p.close()
