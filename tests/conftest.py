from pathlib import Path

import pytest
import torch
from _world import Worlds

from distclip._clip import compiled


@pytest.fixture(scope="session")
def worlds():
    """``worlds(n)``: a live world of n gloo ranks (see ``_world.World``), shared by the whole session.

    The compiled bfloat16/float16 norm kernel is compiled here first, so that ranks load it from inductor's
    on-disk cache (seconds) rather than compile it (tens of seconds with an empty cache, which the tests'
    collective timeouts would not wait for on a rank whose peer compiles)."""
    for dtype in compiled.DTYPES:
        compiled.square_sums([torch.zeros(2, compiled.ROW, dtype=dtype)])
    pool = Worlds()
    yield pool
    pool.close()


class Virtualenvs:
    """Virtualenvs that the install tests filled as a user would, handed on within the session.

    Creating a virtualenv and installing torch into it is a minute or more of this machine's 2 cores. The
    quickstart's test needs an empty one (the page's install command must be all its setup); the Docker CPU
    recipe's test needs one apart from the checkout's own environment, and takes the quickstart's once that test
    has passed: the recipe then finds the same torch 2.13.0 and numpy there and installs distclip over the
    quickstart's editable install. ``keep(name, venv)`` hands a virtualenv on; ``take(name)`` takes it (once),
    or None where that test did not run or did not pass.
    """

    def __init__(self):
        self._kept: dict[str, Path] = {}

    def keep(self, name: str, venv: Path) -> None:
        self._kept[name] = venv

    def take(self, name: str) -> Path | None:
        return self._kept.pop(name, None)


@pytest.fixture(scope="session")
def virtualenvs():
    """The session's :class:`Virtualenvs`."""
    return Virtualenvs()
