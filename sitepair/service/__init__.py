"""Running sitepair's daemons as services: what they tell the service manager, and the units.

:mod:`.notify` speaks systemd's notify protocol (readiness, watchdog, status); :mod:`.runtime`
ties it and the SIGHUP reload to a daemon's event loop; :mod:`.systemd` writes, removes and
shows the systemd units; :mod:`.cli` adds the ``service`` commands to both programs. The Windows
service lives in ``agent/winservice.py``.
"""
