import pytest

from _world import Worlds


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n)``: a live world of n gloo ranks (see ``_world.World``), shared by the whole session."""
    pool = Worlds()
    yield pool
    pool.close()
