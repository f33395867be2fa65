"""Replay captures through activators: ``fabricd activator test`` and its pytest fixture.

capture.py reads pcaps, tcpflows.py reassembles TCP, backend.py plays the captured
server, replay.py drives the real host (and the real stream core) on the capture's
clock, timeline.py records and renders what happened, expect.py checks it. The model and
its limits: fabric/activator/HARNESS.md.
"""
