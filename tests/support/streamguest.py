"""The stream test helper lives in the package now (fabric/activator/streamguest.py), so
activator projects can use it; re-exported for the suite's imports."""

from fabric.activator.streamguest import StreamGuest, StreamView

__all__ = ["StreamGuest", "StreamView"]
