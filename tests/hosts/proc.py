"""Subprocesses for the directory-backend tests (they must run in another process, or die).

``python -m tests.hosts.proc write VM_ROOT VM SEED LOG STOP [--aligned] [--flush-every N]
[--count N] [--pace S]``
    Follow the write plan ``SEED`` through ``DirectoryBackend.open_writer``: append ``S n`` to
    LOG before write n and ``D n`` after it returned (one unbuffered ``write`` each, so the
    lines survive a SIGKILL); stop when the file STOP exists. ``R`` = ready, ``E`` = ended.

``python -m tests.hosts.proc release VM_ROOT VM CUT_ID [--crash POINT]``
``python -m tests.hosts.proc cut VM_ROOT VM [--crash POINT]``
    Run ``release_cut`` / ``take_cut`` and SIGKILL this process at crash point POINT: a name
    the backend passes to its fault hook, or ``merge-write:<fmt>`` (right after a write a
    merge makes into a disk of that format), ``relink-before`` / ``relink-after`` (around the
    merge's relink of the layer above). ``POINT@N`` dies at the N-th time POINT is reached.
"""

from __future__ import annotations

import argparse
import os
import signal
import time
from pathlib import Path
from typing import Any

from agent.hosts.directory import DirectoryBackend
from tests.hosts.helpers import write_op


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_crash(spec: str) -> Any:
    """Patch what is needed to die at ``spec`` (``POINT`` or ``POINT@N``); returns the
    backend's fault hook."""
    point, _, nth = spec.partition("@")
    remaining = [int(nth or 1)]

    def reached(name: str) -> None:
        if name == point:
            remaining[0] -= 1
            if remaining[0] == 0:
                die()

    if point.startswith("merge-write:"):
        from sitepair.vdisk.vhd import VhdDisk
        from sitepair.vdisk.vhdx import VhdxDisk

        cls: Any = VhdxDisk if point.endswith("vhdx") else VhdDisk
        real_write = cls.write

        def write(self: Any, offset: int, data: Any) -> None:
            real_write(self, offset, data)
            reached(point)

        cls.write = write
    elif point in ("relink-before", "relink-after"):
        from sitepair.vdisk import ops

        real_set_parent = ops.set_parent

        def set_parent(child: Any, parent: Any) -> None:
            reached("relink-before")
            real_set_parent(child, parent)
            reached("relink-after")

        ops.set_parent = set_parent

    return reached


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("write")
    w.add_argument("vm_root", type=Path)
    w.add_argument("vm")
    w.add_argument("seed", type=int)
    w.add_argument("log", type=Path)
    w.add_argument("stop", type=Path)
    w.add_argument("--aligned", action="store_true")
    w.add_argument("--flush-every", type=int, default=0)
    w.add_argument("--count", type=int, default=1_000_000)
    w.add_argument("--pace", type=float, default=0.0002)
    r = sub.add_parser("release")
    r.add_argument("vm_root", type=Path)
    r.add_argument("vm")
    r.add_argument("cut_id")
    r.add_argument("--crash", default="")
    c = sub.add_parser("cut")
    c.add_argument("vm_root", type=Path)
    c.add_argument("vm")
    c.add_argument("--crash", default="")
    args = parser.parse_args()

    if args.cmd == "write":
        backend = DirectoryBackend(args.vm_root)
        fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        with backend.open_writer(args.vm) as writer:
            os.write(fd, b"R\n")
            for n in range(1, args.count + 1):
                if n % 8 == 0 and args.stop.exists():
                    break
                disk, offset, data = write_op(args.seed, n, aligned=args.aligned)
                os.write(fd, f"S {n}\n".encode())
                writer.write(disk, offset, data)
                if args.flush_every and n % args.flush_every == 0:
                    writer.flush()
                os.write(fd, f"D {n}\n".encode())
                if args.pace:
                    time.sleep(args.pace)
        os.write(fd, b"E\n")
        return 0

    hook = install_crash(args.crash) if args.crash else None
    backend = DirectoryBackend(args.vm_root, fault_hook=hook)
    if args.cmd == "release":
        backend.release_cut(args.vm, args.cut_id)
    else:
        backend.take_cut(args.vm)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
