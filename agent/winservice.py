"""The agent as a Windows service (pywin32's service framework), behind a seam tested on Linux.

Three parts, two of them platform-neutral:

- :class:`WindowsCommands` is what ``sitepair-agent service install|remove|start|stop|status``
  does on Windows: which service to create (started automatically, running
  ``AgentService`` from this module in pywin32's service host, with the home stored as the
  service's ``home`` option), the recovery actions (restart after 5 s, 5 s, then 60 s; the count
  resets after a day; also when the service stops with an error, not only when it crashes), and
  the order of the calls. It speaks to Windows only through :class:`Win32`.
- :class:`ServiceHost` runs the agent daemon on the service's thread and stops it: the Service
  Control Manager's Stop only calls :meth:`ServiceHost.request_stop`, which asks
  ``AgentDaemon.shutdown()`` on the daemon's event loop, the same path SIGTERM takes on Linux.
- The Windows-only code (``if sys.platform == "win32"`` below): :class:`PyWin32`, the real
  :class:`Win32` through pywin32 (an optional dependency: ``pip install sitepair[windows]``),
  and ``AgentService``, the ``win32serviceutil.ServiceFramework`` subclass, which only forwards
  Start and Stop to a :class:`ServiceHost` and reports to the Windows Event Log.

Tests on Linux (tests/service/test_winservice.py) drive the first two with a fake of
:class:`Win32`; the Windows-only code cannot run there. docs/windows-service.md has the
first-run checklist for a real Windows host.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import logging.handlers
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from agent import config as config_mod
from sitepair import log as sitepair_log
from sitepair.errors import FailedPrecondition, InvalidArgument
from sitepair.service.cli import InstallOptions

log = logging.getLogger("sitepair.agent.service")

#: The Python class the service host runs (pywin32's "class string").
SERVICE_CLASS = "agent.winservice.AgentService"
DISPLAY_NAME = "sitepair agent"
DESCRIPTION = "sitepair disaster-recovery agent: replicates this host's VMs (sitepair-agent run)"
#: The service option (in the service's registry key) that names the agent home.
HOME_OPTION = "home"


@dataclasses.dataclass(frozen=True)
class RecoveryAction:
    #: "restart" (the only kind we use; Windows also knows "reboot" and "run").
    kind: str
    delay_ms: int


#: What the Service Control Manager does after the 1st, 2nd and later failures (``sc failure``).
RECOVERY_ACTIONS = (
    RecoveryAction("restart", 5_000),
    RecoveryAction("restart", 5_000),
    RecoveryAction("restart", 60_000),
)
#: Seconds without a failure after which the failure count starts again.
RECOVERY_RESET_SECONDS = 24 * 3600


class Win32(Protocol):
    """The Windows calls the agent's service needs: the boundary that cannot run on Linux."""

    def install(
        self,
        name: str,
        *,
        class_string: str,
        display_name: str,
        description: str,
        account: str | None,
    ) -> None: ...
    def set_option(self, name: str, option: str, value: str) -> None: ...
    def set_recovery(
        self,
        name: str,
        *,
        actions: tuple[RecoveryAction, ...],
        reset_seconds: int,
        on_error_exit: bool,
    ) -> None: ...
    def remove(self, name: str) -> None: ...
    def start(self, name: str) -> None: ...
    def stop(self, name: str) -> None: ...
    def state(self, name: str) -> str | None:
        """The state ("running", "stopped", "start pending" ...); None: no such service."""
        ...


class WindowsCommands:
    """``sitepair-agent service ...`` on Windows (sitepair.service.cli.WindowsService)."""

    def __init__(self, win32: Win32) -> None:
        self.win32 = win32

    def command(self, action: str, options: InstallOptions) -> str:
        name = options.name
        if action == "install":
            return self.install(options)
        if action == "remove":
            if self.win32.state(name) not in (None, "stopped"):
                self.win32.stop(name)
            self.win32.remove(name)
            return f"removed the Windows service {name}"
        if action == "start":
            self.win32.start(name)
            return f"started {name}"
        if action == "stop":
            self.win32.stop(name)
            return f"asked {name} to stop; the agent shuts down cleanly"
        if action == "status":
            state = self.win32.state(name)
            if state is None:
                return (
                    f"no Windows service {name}; install it with: sitepair-agent service install "
                    f"--home {options.home}, or run it in the foreground: sitepair-agent run "
                    f"--home {options.home}"
                )
            return f"{name}: {state}"
        raise InvalidArgument(f"unknown service action {action!r}")

    def install(self, options: InstallOptions) -> str:
        config_mod.load(options.home)  # a folder that is no agent home stops here
        name = options.name
        if self.win32.state(name) is not None:
            raise FailedPrecondition(
                f"a Windows service {name} already exists",
                hint="remove it first (sitepair-agent service remove), or pass --name",
            )
        self.win32.install(
            name,
            class_string=SERVICE_CLASS,
            display_name=DISPLAY_NAME if name == "sitepair-agent" else f"{DISPLAY_NAME} ({name})",
            description=DESCRIPTION,
            account=options.user,
        )
        self.win32.set_option(name, HOME_OPTION, str(options.home))
        self.win32.set_recovery(
            name,
            actions=RECOVERY_ACTIONS,
            reset_seconds=RECOVERY_RESET_SECONDS,
            on_error_exit=True,
        )
        if options.enable:
            self.win32.start(name)
            return f"installed and started the Windows service {name} for {options.home}"
        return (
            f"installed the Windows service {name} for {options.home}; start it with: "
            "sitepair-agent service start"
        )


class Daemon(Protocol):
    async def run(self, *, on_ready: Callable[[], None] | None = None) -> None: ...
    async def shutdown(self) -> None: ...


def _make_daemon(home: Path) -> Daemon:
    from agent.daemon import AgentDaemon

    return AgentDaemon(home)


class ServiceHost:
    """Runs the agent on the service's thread; :meth:`request_stop` may come from any thread."""

    def __init__(
        self,
        home: Path,
        *,
        report: Callable[[str, str], None],
        make_daemon: Callable[[Path], Daemon] = _make_daemon,
        setup_logging: bool = True,
        log_handler: logging.Handler | None = None,
    ) -> None:
        """``report(kind, message)`` writes to the Event Log ("info", "warning", "error");
        ``log_handler`` also gets the agent's log records (added after the log is set up)."""
        self.home = home
        self._report = report
        self._make_daemon = make_daemon
        self._setup_logging = setup_logging
        self._log_handler = log_handler
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._daemon: Daemon | None = None
        self._stop_requested = False
        #: The shutdown tasks asked for (kept, so they are not collected while they run).
        self._shutdowns: list[asyncio.Task[None]] = []

    def run(self) -> int:
        """Run the agent until it is asked to stop (0) or fails (1, reported: recovery then
        restarts the service)."""
        try:
            if self._setup_logging:
                sitepair_log.configure(config_mod.load(self.home).log)
            if self._log_handler is not None:
                logging.getLogger().addHandler(self._log_handler)
            asyncio.run(self._main())
        except Exception as exc:
            self._report("error", f"sitepair agent stopped on an error: {exc}")
            log.exception("agent service failed")
            return 1
        self._report("info", "sitepair agent stopped")
        return 0

    async def _main(self) -> None:
        with self._lock:
            if self._stop_requested:
                return  # stopped before it started: nothing to run, nothing locked
            self._loop = asyncio.get_running_loop()
        daemon = self._make_daemon(self.home)
        with self._lock:
            self._daemon = daemon
        stop_now = self.stop_requested  # a Stop while the daemon was being built

        def ready() -> None:
            self._report("info", f"sitepair agent running: {self.home}")
            if stop_now:
                self._shutdowns.append(asyncio.get_running_loop().create_task(daemon.shutdown()))

        await daemon.run(on_ready=ready)

    @property
    def stop_requested(self) -> bool:
        with self._lock:
            return self._stop_requested

    def request_stop(self) -> None:
        """The service's Stop: ask the daemon to shut down, as SIGTERM does; nothing more."""
        with self._lock:
            self._stop_requested = True
            loop, daemon = self._loop, self._daemon
        if loop is None or daemon is None:
            return  # not started, or the daemon is being built: _main sees the flag
        with contextlib.suppress(RuntimeError):  # the loop has already closed
            loop.call_soon_threadsafe(
                lambda: self._shutdowns.append(loop.create_task(daemon.shutdown()))
            )


if sys.platform == "win32":  # pragma: no cover - the part that runs on Windows only
    import servicemanager
    import win32service
    import win32serviceutil

    _STATES = {
        win32service.SERVICE_STOPPED: "stopped",
        win32service.SERVICE_START_PENDING: "start pending",
        win32service.SERVICE_STOP_PENDING: "stop pending",
        win32service.SERVICE_RUNNING: "running",
        win32service.SERVICE_CONTINUE_PENDING: "continue pending",
        win32service.SERVICE_PAUSE_PENDING: "pause pending",
        win32service.SERVICE_PAUSED: "paused",
    }

    class PyWin32:
        """:class:`Win32` through pywin32."""

        def install(
            self,
            name: str,
            *,
            class_string: str,
            display_name: str,
            description: str,
            account: str | None,
        ) -> None:
            if class_string == SERVICE_CLASS:
                # pywin32's service host finds the class by its module's file path.
                class_string = win32serviceutil.GetServiceClassString(AgentService)
            win32serviceutil.InstallService(
                class_string,
                name,
                display_name,
                startType=win32service.SERVICE_AUTO_START,
                userName=account,
                description=description,
            )

        def set_option(self, name: str, option: str, value: str) -> None:
            win32serviceutil.SetServiceCustomOption(name, option, value)

        def set_recovery(
            self,
            name: str,
            *,
            actions: tuple[RecoveryAction, ...],
            reset_seconds: int,
            on_error_exit: bool,
        ) -> None:
            scm = win32service.OpenSCManager(None, None, win32service.SC_MANAGER_ALL_ACCESS)
            try:
                svc = win32service.OpenService(scm, name, win32service.SERVICE_ALL_ACCESS)
                try:
                    win32service.ChangeServiceConfig2(
                        svc,
                        win32service.SERVICE_CONFIG_FAILURE_ACTIONS,
                        {
                            "ResetPeriod": reset_seconds,
                            "RebootMsg": None,
                            "Command": None,
                            "Actions": [
                                (win32service.SC_ACTION_RESTART, a.delay_ms) for a in actions
                            ],
                        },
                    )
                    # Recovery also when the service stops with an error, not only on a crash.
                    win32service.ChangeServiceConfig2(
                        svc, win32service.SERVICE_CONFIG_FAILURE_ACTIONS_FLAG, on_error_exit
                    )
                finally:
                    win32service.CloseServiceHandle(svc)
            finally:
                win32service.CloseServiceHandle(scm)

        def remove(self, name: str) -> None:
            win32serviceutil.RemoveService(name)

        def start(self, name: str) -> None:
            win32serviceutil.StartService(name)

        def stop(self, name: str) -> None:
            win32serviceutil.StopService(name)

        def state(self, name: str) -> str | None:
            try:
                status = win32serviceutil.QueryServiceStatus(name)
            except Exception:  # noqa: BLE001 - pywintypes.error: no such service
                return None
            return _STATES.get(status[1], str(status[1]))

    def _report(kind: str, message: str) -> None:
        {
            "info": servicemanager.LogInfoMsg,
            "warning": servicemanager.LogWarningMsg,
        }.get(kind, servicemanager.LogErrorMsg)(message)

    class AgentService(win32serviceutil.ServiceFramework):  # type: ignore[misc]
        _svc_name_ = "sitepair-agent"
        _svc_display_name_ = DISPLAY_NAME
        _svc_description_ = DESCRIPTION

        def __init__(self, args: list[str]) -> None:
            super().__init__(args)
            name = args[0] if args else self._svc_name_
            home = win32serviceutil.GetServiceCustomOption(name, HOME_OPTION)
            # Warnings and errors of the agent's log also go to the Event Log.
            events = logging.handlers.NTEventLogHandler(name)
            events.setLevel(logging.WARNING)
            self.host = ServiceHost(Path(str(home)), report=_report, log_handler=events)

        def SvcDoRun(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_RUNNING)
            if self.host.run() != 0:
                # An unhandled error ends the service with an error exit, which the recovery
                # options (with the failure-actions flag) answer with a restart.
                raise RuntimeError(
                    "the sitepair agent stopped on an error: see the Event Log and its log file"
                )

        def SvcStop(self) -> None:
            self.ReportServiceStatus(win32service.SERVICE_STOP_PENDING)
            self.host.request_stop()

    WINDOWS_COMMANDS = WindowsCommands(PyWin32())
