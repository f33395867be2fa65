"""Settings shared by every suite."""

from collections.abc import Iterator

import pytest
from hypothesis import settings

from fabric.tools.sandbox import Sandbox

# Property tests check behaviour, not speed: on a shared 2-core machine one example can
# take far longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile("fabricd", deadline=None)
settings.load_profile("fabricd")


@pytest.fixture
def sandbox() -> Iterator[Sandbox]:
    """Namespaces (and the files of daemons in them) removed after the test, also on
    failure: the e2e suite and the soak use it."""
    sb = Sandbox("fbt")
    try:
        yield sb
    finally:
        sb.close()
