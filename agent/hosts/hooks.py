"""Checkpoint hooks of the ``directory`` backend: the analog of VSS in a Hyper-V guest.

A VM folder may hold ``hooks/pre-checkpoint`` and ``hooks/post-checkpoint``: an executable
file, or a Python script with the ``.py`` suffix (run with the agent's own interpreter, which
is also how to write hooks on Windows). For an application-consistent cut, the backend runs
``pre-checkpoint`` before it freezes the disks (the guest flushes and quiesces its
applications, as VSS writers do on "freeze") and ``post-checkpoint`` after (VSS "thaw").

A hook runs with the VM folder as its working directory and ``SITEPAIR_VM_ID``,
``SITEPAIR_VM_NAME``, ``SITEPAIR_VM_DIR`` and ``SITEPAIR_HOOK`` in its environment. It has
:data:`DEFAULT_TIMEOUT` seconds; a non-zero exit or a timeout of ``pre-checkpoint`` means no
cut is taken.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sitepair.errors import FailedPrecondition

DEFAULT_TIMEOUT = 60.0
_OUTPUT_TAIL = 2000


def find_hook(folder: Path, name: str) -> list[str] | None:
    """The command line of hook ``name``, or ``None`` if the VM has none."""
    hooks = folder / "hooks"
    script = hooks / f"{name}.py"
    plain = hooks / name
    if plain.is_file() and os.access(plain, os.X_OK):
        return [str(plain)]
    if script.is_file():
        return [sys.executable, str(script)]
    return None


def run_hook(
    folder: Path, name: str, *, vm_id: str, vm_name: str, timeout: float = DEFAULT_TIMEOUT
) -> bool:
    """Run hook ``name`` if the VM has it: ``False`` if it has none, ``True`` if it succeeded;
    raises :class:`FailedPrecondition` (with the end of its output) if it failed."""
    argv = find_hook(folder, name)
    if argv is None:
        return False
    env = {
        **os.environ,
        "SITEPAIR_VM_ID": vm_id,
        "SITEPAIR_VM_NAME": vm_name,
        "SITEPAIR_VM_DIR": str(folder),
        "SITEPAIR_HOOK": name,
    }
    where = f"VM {vm_name}: {name} hook {argv[-1]}"
    try:
        proc = subprocess.run(
            argv,
            cwd=folder,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise FailedPrecondition(
            f"{where} did not finish within {timeout:g} s; it was stopped",
            hint="make the hook finish faster or fix what it waits for",
        ) from exc
    except OSError as exc:
        raise FailedPrecondition(f"{where} could not be started: {exc.strerror or exc}") from exc
    if proc.returncode != 0:
        output = (proc.stdout + proc.stderr).decode(errors="replace").strip()
        tail = output[-_OUTPUT_TAIL:] if output else "(no output)"
        raise FailedPrecondition(
            f"{where} failed with exit code {proc.returncode}: {tail}",
            hint="fix the guest application the hook quiesces, or take a crash-consistent cut",
        )
    return True
