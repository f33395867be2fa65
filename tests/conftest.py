"""Settings shared by every suite."""

from hypothesis import settings

# Property tests check behaviour, not speed: on a shared 2-core machine one example can
# take far longer than hypothesis's default 200 ms deadline without anything being wrong.
settings.register_profile("fabricd", deadline=None)
settings.load_profile("fabricd")
