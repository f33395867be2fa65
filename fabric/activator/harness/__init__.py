"""Replay captures through activators: ``fabricd activator test`` and its pytest fixture.

capture.py reads pcaps, tcpflows.py reassembles TCP, backend.py plays the captured
server; replay.py sets a replay up and runs it on the capture's clock: run.py (the
recorder around the real host, the agenda, need and wake) under packetrun.py (what the
daemon's dispatch does for L3 activators) or streamrun.py (the daemon's front around the
real stream core); result.py is what it returns, timeline.py records and renders what
happened, expect.py checks it, funcnames.py names trap frames, cli.py is the command,
pytest_plugin.py the fixture. The model and
its limits: docs/activators.md ("Testing with a capture").
"""
