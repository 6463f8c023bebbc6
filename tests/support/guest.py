"""Real guest images for the qemu tests: a Debian kernel, a busybox initramfs and a workload
whose data can be verified after a failover, on two VHDX disks, built from Debian packages only.

What is built (``GuestImage.build``), and why this way:

- **Kernel**: the current ``linux-image-<version>-amd64`` named by ``linux-image-amd64``'s
  dependency (``apt-cache depends``), fetched with ``apt-get download`` into the cache and
  unpacked with ``dpkg-deb -x`` into a scratch folder; it is never installed on the host. The
  cache keeps the .deb (one kernel: a newer one replaces it); of the 400 MB unpacked, only
  ``vmlinuz`` and the few modules the guest loads go into the image.
- **Modules**: the Debian kernel builds the drivers this guest needs as modules (see its
  ``boot/config-*``): virtio_pci and virtio_blk (the disks), ext4 with jbd2, mbcache and crc16
  (the data filesystem), crc32c_generic (ext4's metadata checksums ask the crypto API for
  "crc32c"; without modprobe in the guest nothing would load it on demand, so it is loaded
  explicitly, which also satisfies ext4's ``softdep``), evdev and button (the ACPI power button
  as an input device, for ``system_powerdown``), qemu_fw_cfg (per-VM parameters without
  touching the disks) and virtio_console (virtio-serial: qemu-guest-agent's channel).
  Dependencies are resolved here by reading each ``.ko``'s ``.modinfo`` section (``depends=``
  and ``softdep=pre:``), so no modinfo/depmod is needed on the host, and the guest's ``/init``
  insmods them in that order. Built-in ones (``modules.builtin``) are skipped.
- **Initramfs**: a gzip'd cpio (newc) written by this module, not by the cpio tool, so it can
  hold ``/dev/console`` without root and is byte-for-byte reproducible (mtime 0). It holds
  busybox from busybox-static (``--install -s`` at boot), the modules, the host's ``e2fsck``
  and ``qemu-ga`` (qemu-guest-agent) with the shared libraries ``ldd`` names, and the ``/init``
  below. ``mke2fs`` is not included: the guest never formats its data disk, because a guest
  that formatted a disk it could not read would turn a lost filesystem into an empty,
  "verified" one.
- **Boot disk**: an unpartitioned FAT image with SYSLINUX, the kernel and the initramfs, made
  with ``mkfs.fat``, ``syslinux --install`` (the mtools installer) and ``mcopy``: no loop device,
  no mount, no root needed. The VM boots it through SeaBIOS from a virtio-blk disk, as the
  recovery host will boot the replicated disk after a failover (``-kernel`` would hide a boot
  disk that did not replicate). FAT+SYSLINUX is the smallest firmware-bootable layout that
  tools in Debian write into a plain file; GRUB would need a partition table and grub-install
  on a block device.
- **Data disk**: ext4 made by ``mkfs.ext4 -d`` in a raw file (4 KiB blocks, an empty ``log``
  and a ``records/`` folder already there), no mount needed. Its 64 MiB hold about 1060
  records (~40 KiB each): about 6 minutes at the default pace (0.2 s between records), under
  3 flat out (``sitepair.interval=0``); then the writer stops with ``SITEPAIR WRITER full``
  and the guest idles until powered down. Verifying a full disk at boot takes ~4 s more.
- **Power button**: ``/init`` reads the "Power Button" input device (ACPI fixed-feature
  button, driver ``button``, via ``evdev``) itself, with ``dd``: any event on it means a
  press. That is simpler than busybox ``acpid`` plus action scripts and has no moving parts.

Both raw images are converted to dynamic VHDX with the project's own ``sitepair.vdisk``
(``convert``) and checked with ``qemu-img check`` and ``qemu-img compare`` against the raw
image. The images are cached under a key covering every input (kernel package version,
busybox, e2fsprogs, qemu-guest-agent and syslinux versions, digests of the host binaries copied
in and of their shared libraries, the init script and the awk programs, the module list, the
sizes); callers copy the templates per VM (``GuestImage.copy_disks``).

The guest (``/init``, PID 1) on every boot:

1. mounts proc, sys and devtmpfs, quiets the kernel console (``dmesg -n 1``), loads the modules;
2. reads parameters from the kernel command line, then from the fw_cfg file
   ``opt/sitepair/args`` (QEMU ``-fw_cfg``), later ones winning: ``sitepair.seed``,
   ``sitepair.interval`` (seconds between records), ``sitepair.max`` (last seq to write, 0 =
   no limit), ``sitepair.writer`` (0 = verify only), ``sitepair.minfree_kb``;
3. opens the ACPI power button's event device (found by name in sysfs) before anything else
   can be acknowledged, so a ``system_powerdown`` sent after any ACK is never lost;
4. finds the data disk: the first virtio disk with an ext2/3/4 superblock (normally /dev/vdb;
   /dev/vda is the FAT boot disk);
5. runs ``e2fsck -p`` (preen: replays the journal) then ``e2fsck -fn`` and prints
   ``SITEPAIR FSCK preen=<rc> check=<rc> journal=<0|1> verdict=<clean|replayed|repaired|errors>``;
6. mounts it and verifies every record: ``SITEPAIR VERIFY count=<n> last=<seq> ok=<0|1>
   torn=<0|1> [bad=<seq> reason=<format|gap|missing|digest|nolog|nodisk|mount>]``;
7. starts qemu-guest-agent when the VM has its virtio-serial port ``org.qemu.guest_agent.0``
   (QEMU ``-device virtserialport,name=org.qemu.guest_agent.0``; ``launch_guest(qga=True)``):
   links ``/dev/virtio-ports/org.qemu.guest_agent.0`` to the port's ``/dev/vportNpM`` (what udev
   would do) and runs ``qemu-ga -d`` on it, after the data filesystem is mounted, so
   ``guest-fsfreeze-freeze`` freezes it (FIFREEZE; the writer then blocks in its next write or
   sync until ``guest-fsfreeze-thaw``). It prints ``SITEPAIR QGA started port=/dev/vportNpM``
   once the daemon holds the port open, or ``SITEPAIR QGA failed reason=<nochannel|noport|exit|
   exited|timeout>``; the workload never depends on it;
8. if verification passed, writes records from ``last+1`` on, each acknowledged as
   ``SITEPAIR ACK <seq> <sha256>`` only once durable, then timed as ``SITEPAIR LATENCY <seq>
   record_us=<write to durable> fsync_us=<its two syncs> at=<guest epoch>`` (busybox ash's
   ``$EPOCHREALTIME``; no such line where the shell lacks it);
9. on a power-button press: stops the writer after its current record, syncs, unmounts, prints
   ``SITEPAIR SHUTDOWN clean`` and powers off.

Every line the tests parse starts with ``SITEPAIR `` so kernel noise never confuses the parser.

The record format: record ``seq`` is the file ``records/<seq>`` on the data disk, holding a
header line and 2048..8192 eight-digit hex words from a Lehmer generator (minstd, modulus
2^31-1, multiplier 48271) seeded from ``(seed, seq)``: 16-64 KiB of deterministic
pseudo-random text, written by busybox awk in the guest and reproduced by
:func:`record_bytes` here (integers stay below 2^53, so awk's doubles compute them exactly).
Its durability order: write the file, fsync it, fsync ``records/``, append ``"<seq> <sha256>\\n"``
to ``log``, fsync ``log``, and only then print the ACK. So any line in the log has its data on
disk, and any ACK has both. Verification checks that ``log`` is a gap-free sequence from 1 of
well-formed lines (a torn last line, not newline-terminated, is an unacknowledged write cut
by a crash: reported as ``torn=1``, not counted, and cut off before writing resumes) and that
every listed file's sha256 is the logged one. The tests also check each ACK's digest against
:func:`record_digest`, which ties the console, the log and the bytes together.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import stat
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

#: Bump when the build changes in a way the inputs hashed into the cache key do not show.
BUILD_FORMAT = 1
#: Environment variable that overrides the cache folder.
CACHE_ENV = "SITEPAIR_GUEST_CACHE"
#: The repository's root; the default cache is in its ignored ``.cache/``.
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CACHE = REPO_ROOT / ".cache" / "guest"

BOOT_DISK_MIB = 32
DATA_DISK_MIB = 64
DATA_BLOCK_SIZE = 4096
#: The data VHDX's block size: the smallest VHDX allows, so the workload makes QEMU allocate
#: new blocks (BAT updates through the VHDX log) as it runs, as a growing real disk does. The
#: boot disk, never written, keeps the format's default (32 MiB, as Hyper-V makes them).
DATA_VHDX_BLOCK = 1024 * 1024
#: Modules the guest asks for; their dependencies are added by :func:`resolve_modules`.
WANTED_MODULES = (
    "virtio_pci",
    "virtio_blk",
    "crc32c_generic",
    "ext4",
    "evdev",
    "button",
    "qemu_fw_cfg",
    "virtio_console",
)
#: The kernel command line. ``panic=-1`` reboots at once on a panic and ``-no-reboot`` then
#: ends QEMU, so a broken guest ends its test instead of hanging it.
KERNEL_CMDLINE = "console=ttyS0,115200 quiet loglevel=1 panic=-1"
#: The fw_cfg file the init reads its per-VM parameters from.
FW_CFG_NAME = "opt/sitepair/args"
#: The virtio-serial port name qemu-guest-agent listens on (QEMU's and the qemu backend's).
QGA_PORT_NAME = "org.qemu.guest_agent.0"

#: Host tools the builder runs, with the Debian package that provides each.
BUILD_TOOLS = {
    "apt-get": "apt",
    "apt-cache": "apt",
    "dpkg-deb": "dpkg",
    "busybox": "busybox-static",
    "e2fsck": "e2fsprogs",
    "mkfs.ext4": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "ldd": "libc-bin",
    "mkfs.fat": "dosfstools",
    "syslinux": "syslinux",
    "mcopy": "mtools",
    "qemu-img": "qemu-utils",
    "qemu-ga": "qemu-guest-agent",
}
QEMU_BINARY = "qemu-system-x86_64"

GEN_AWK = r"""# sitepair record generator: seed and seq in, the record's bytes out (see guest.py).
BEGIN {
    m = 2147483647
    x = (seed * 1000003 + seq * 7919 + 1) % m
    if (x == 0) x = 1
    x = (x * 48271) % m
    n = 2048 + x % 6145
    printf "sitepair record seed=%d seq=%d words=%d\n", seed, seq, n
    for (i = 1; i <= n; i++) {
        x = (x * 48271) % m
        printf "%08x", x
        if (i % 8 == 0) printf "\n"
    }
    printf "\n"
}
"""

VERIFY_AWK = r"""# sitepair verifier: ARGV[1] is the log's complete lines, ARGV[2] is sha256sum's output for
# the listed records ("<digest>  <seq>"). Prints "count=<n> last=<n> ok=<0|1> [bad=.. reason=..]".
FILENAME == ARGV[1] {
    if (bad) next
    if ($0 !~ /^[0-9]+ [0-9a-f]+$/ || length($2) != 64) { bad = n + 1; why = "format"; next }
    if ($1 + 0 != n + 1) { bad = n + 1; why = "gap"; next }
    n++
    want[n] = $2
    next
}
{ got[$2] = $1 }
END {
    if (!bad) {
        for (i = 1; i <= n; i++) {
            if (!(i in got)) { bad = i; why = "missing"; break }
            if (got[i] != want[i]) { bad = i; why = "digest"; break }
        }
    }
    if (bad) printf "count=%d last=%d ok=0 bad=%d reason=%s\n", n, n, bad, why
    else printf "count=%d last=%d ok=1\n", n, n
}
"""

INIT_SCRIPT = r"""#!/bin/sh
# sitepair test guest: /init of the initramfs, PID 1. The design is described in
# tests/support/guest.py. Every line the tests parse starts with "SITEPAIR ".
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
/bin/busybox mkdir -p /proc /sys /dev /sbin /usr/bin /usr/sbin /data /tmp
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
dmesg -n 1

say() { echo "SITEPAIR $*"; }
isnum() { case $1 in ''|*[!0-9]*) return 1;; esac; return 0; }
forever() { while :; do sleep 3600; done; }

say "BOOT kernel=$(uname -r)"
while read -r m; do
    insmod "/lib/modules/$m" || say "ERROR insmod $m"
done </etc/sitepair/modules

SEED=1 INTERVAL=0.2 MAX=0 WRITER=1 MINFREE_KB=4096
params() {
    for p in "$@"; do
        v=${p#*=}
        case $p in
        sitepair.seed=*) isnum "$v" && SEED=$v ;;
        sitepair.interval=*) case $v in ''|*[!0-9.]*) ;; *) INTERVAL=$v ;; esac ;;
        sitepair.max=*) isnum "$v" && MAX=$v ;;
        sitepair.writer=*) isnum "$v" && WRITER=$v ;;
        sitepair.minfree_kb=*) isnum "$v" && MINFREE_KB=$v ;;
        esac
    done
}
set -f  # split the parameters into words, but never expand them as globs
params $(cat /proc/cmdline)
FW=/sys/firmware/qemu_fw_cfg/by_name/opt/sitepair/args/raw
[ -r "$FW" ] && params $(cat "$FW")
set +f
say "PARAMS seed=$SEED interval=$INTERVAL max=$MAX writer=$WRITER minfree_kb=$MINFREE_KB"

# The power button: open its event device now, so that a press at any later time is queued.
PWR=
for i in /sys/class/input/input*; do
    [ "$(cat "$i/name" 2>/dev/null)" = "Power Button" ] || continue
    for e in "$i"/event*; do
        [ -c "/dev/input/${e##*/}" ] && { PWR=/dev/input/${e##*/}; break 2; }
    done
done
if [ -n "$PWR" ]; then
    exec 3<"$PWR"
    say "POWER button=$PWR"
else
    say "ERROR no power button"
fi

# The data disk: the first virtio disk with an ext2/3/4 superblock (magic 0xEF53 at 1080).
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
DATA=
for d in /dev/vd[a-z]; do
    [ -b "$d" ] || continue
    magic=$(dd if="$d" bs=2 skip=540 count=1 2>/dev/null | hexdump -v -e '2/1 "%02x"')
    [ "$magic" = "53ef" ] && { DATA=$d; break; }
done
say "DISK data=${DATA:-none}"

OK=0 LAST=0 MOUNTED=0 VERDICT=none
if [ -n "$DATA" ]; then
    e2fsck -p "$DATA" >/tmp/fsck-preen.log 2>&1
    P=$?
    e2fsck -fn "$DATA" >/tmp/fsck-check.log 2>&1
    N=$?
    J=0
    grep -q "recovering journal" /tmp/fsck-preen.log && J=1
    # e2fsck -p exits 0 after a journal replay that needed nothing else, or 1 (fixed).
    if [ $N -ne 0 ] || [ $P -gt 1 ]; then VERDICT=errors
    elif [ $J -eq 1 ]; then VERDICT=replayed
    elif [ $P -eq 0 ]; then VERDICT=clean
    else VERDICT=repaired
    fi
    say "FSCK preen=$P check=$N journal=$J verdict=$VERDICT"
    if [ "$VERDICT" != clean ]; then
        cat /tmp/fsck-preen.log /tmp/fsck-check.log | head -n 40 | while read -r l; do
            say "FSCKLOG $l"
        done
    fi
    if mount -t ext4 "$DATA" /data; then
        MOUNTED=1
    else
        say "VERIFY count=0 last=0 ok=0 torn=0 bad=1 reason=mount"
    fi
else
    say "VERIFY count=0 last=0 ok=0 torn=0 bad=1 reason=nodisk"
fi

if [ $MOUNTED -eq 1 ]; then
    cd /data
    if [ ! -f log ] || [ ! -d records ]; then
        say "VERIFY count=0 last=0 ok=0 torn=0 bad=1 reason=nolog"
    else
        TORN=0
        if [ -s log ] && [ "$(tail -c 1 log | wc -l)" -eq 0 ]; then TORN=1; fi
        head -n "$(wc -l <log)" log >/tmp/log.complete
        awk '{ print $1 }' /tmp/log.complete | (cd records && xargs -r sha256sum 2>/dev/null) \
            >/tmp/sums
        R=$(awk -f /etc/sitepair/verify.awk /tmp/log.complete /tmp/sums)
        case $R in *" ok=1"*) OK=1 ;; esac
        LAST=$(echo "$R" | sed -n 's/.* last=\([0-9]*\) .*/\1/p')
        set -f
        set -- $R
        set +f
        say "VERIFY $1 $2 $3 torn=$TORN${4:+ $4}${5:+ $5}"
        if [ $OK -eq 1 ] && [ $TORN -eq 1 ]; then
            cp /tmp/log.complete log.new && sync log.new && mv log.new log && sync .
        fi
    fi
fi

# qemu-guest-agent, for application-consistent cuts (guest-fsfreeze-freeze/thaw), started once
# the data filesystem is mounted and only when the VM has its virtio-serial port. The workload
# never depends on it: any failure is reported and the boot goes on.
QGA=org.qemu.guest_agent.0
qgalog() { head -n 5 /tmp/qga.log 2>/dev/null | while read -r l; do say "QGALOG $l"; done; }
qga_start() {
    vs=0
    for d in /sys/bus/virtio/devices/*; do
        [ "$(cat "$d/device" 2>/dev/null)" = 0x0003 ] && vs=1  # virtio console (serial)
    done
    [ $vs -eq 1 ] || { say "QGA failed reason=nochannel"; return; }
    # The device announces its ports after the driver is up; udev would then make the link.
    port= i=0
    while :; do
        for p in /sys/class/virtio-ports/*; do
            [ "$(cat "$p/name" 2>/dev/null)" = $QGA ] && port=${p##*/}
        done
        [ -n "$port" ] && [ -c "/dev/$port" ] && break
        [ $i -ge 50 ] && { say "QGA failed reason=noport"; return; }
        sleep 0.1
        i=$((i + 1))
    done
    mkdir -p /dev/virtio-ports
    ln -sf "../$port" /dev/virtio-ports/$QGA
    qemu-ga -d -m virtio-serial -p /dev/virtio-ports/$QGA -f /run/qemu-ga.pid -t /run \
        -l /tmp/qga.log 3<&-
    rc=$?
    [ $rc -eq 0 ] || { say "QGA failed reason=exit rc=$rc"; qgalog; return; }
    # The daemon opens the port after forking: started once it holds it open.
    i=0
    while [ $i -lt 100 ]; do
        pid=$(cat /run/qemu-ga.pid 2>/dev/null)
        if [ -z "$(pidof qemu-ga)" ]; then say "QGA failed reason=exited"; qgalog; return; fi
        if isnum "$pid"; then
            for f in /proc/"$pid"/fd/*; do
                [ "$(readlink "$f")" = "/dev/$port" ] || continue
                say "QGA started port=/dev/$port"
                return
            done
        fi
        sleep 0.1
        i=$((i + 1))
    done
    say "QGA failed reason=timeout"
    qgalog
}
qga_start

writer() {
    stop=0
    trap 'stop=1' TERM
    seq=$((LAST + 1))
    cd /data
    while [ $stop -eq 0 ]; do
        if [ "$MAX" -gt 0 ] && [ $seq -gt "$MAX" ]; then say "WRITER done last=$((seq - 1))"; return; fi
        free=$(df -k /data | awk 'NR == 2 { print $4 }')
        if [ "$free" -lt "$MINFREE_KB" ]; then say "WRITER full last=$((seq - 1))"; return; fi
        t0=$EPOCHREALTIME
        awk -v seed="$SEED" -v seq=$seq -f /etc/sitepair/gen.awk >records/$seq
        t1=$EPOCHREALTIME
        sync records/$seq records
        t2=$EPOCHREALTIME
        d=$(sha256sum records/$seq)
        d=${d%% *}
        echo "$seq $d" >>log
        t3=$EPOCHREALTIME
        sync log
        t4=$EPOCHREALTIME
        say "ACK $seq $d"
        # For bench/replication.py: the record's write-to-durable time and its two syncs, in us.
        [ -n "$t0" ] && say "LATENCY $seq record_us=$((${t4%.*}${t4#*.} - ${t0%.*}${t0#*.})) \
fsync_us=$((${t2%.*}${t2#*.} - ${t1%.*}${t1#*.} + ${t4%.*}${t4#*.} - ${t3%.*}${t3#*.})) at=$t0"
        seq=$((seq + 1))
        sleep "$INTERVAL"
    done
    say "WRITER stopped last=$((seq - 1))"
}

W=
if [ $OK -eq 1 ] && [ "$VERDICT" != errors ] && [ "$WRITER" != 0 ]; then
    writer 3<&- &
    W=$!
    say "READY writer=1 next=$((LAST + 1))"
else
    say "READY writer=0"
fi

if [ -n "$PWR" ]; then dd bs=24 count=1 <&3 >/dev/null 2>&1; else forever; fi
say "POWER pressed"
[ -n "$W" ] && kill -TERM "$W" 2>/dev/null && wait "$W"
cd /
sync
if [ $MOUNTED -eq 0 ] || umount /data; then
    say "SHUTDOWN clean"
else
    say "SHUTDOWN unclean reason=umount"
fi
sleep 0.5
poweroff -f
forever
"""

SYSLINUX_CFG = f"""SERIAL 0 115200
DEFAULT sitepair
PROMPT 0
TIMEOUT 0
LABEL sitepair
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND {KERNEL_CMDLINE}
"""

#: Guest clocks may differ from the host's; e2fsck must not call a superblock written "in the
#: future" an error that needs fixing (that would make a clean filesystem look repaired).
E2FSCK_CONF = "[options]\n\tbroken_system_clock = 1\n"

T = TypeVar("T")


class GuestError(RuntimeError):
    """Building, starting or talking to a test guest failed."""


class GuestTimeout(GuestError):
    """A guest did not reach the awaited state in time; the message ends with the log's tail."""


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------

_MINSTD_M = 2147483647
_MINSTD_A = 48271


def record_bytes(seed: int, seq: int) -> bytes:
    """The bytes of record ``seq`` for ``seed``, exactly as the guest's awk writes them."""
    if not 0 <= seed < 2**31 or seq < 1:
        raise ValueError("seed must be in [0, 2**31) and seq >= 1")
    x = (seed * 1000003 + seq * 7919 + 1) % _MINSTD_M or 1
    x = x * _MINSTD_A % _MINSTD_M
    n = 2048 + x % 6145
    parts = [f"sitepair record seed={seed} seq={seq} words={n}\n"]
    for i in range(1, n + 1):
        x = x * _MINSTD_A % _MINSTD_M
        parts.append(f"{x:08x}")
        if i % 8 == 0:
            parts.append("\n")
    parts.append("\n")
    return "".join(parts).encode()


def record_digest(seed: int, seq: int) -> str:
    """The sha256 (hex) the guest acknowledges for record ``seq``."""
    return hashlib.sha256(record_bytes(seed, seq)).hexdigest()


# --------------------------------------------------------------------------------------------
# Host tools
# --------------------------------------------------------------------------------------------


def missing_tools(*, qemu: bool = True) -> list[str]:
    """The build (and, with ``qemu``, run) tools not found on PATH, as ``tool (package)``."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    tools = dict(BUILD_TOOLS)
    if qemu:
        tools[QEMU_BINARY] = "qemu-system-x86"
    return [f"{t} ({p})" for t, p in tools.items() if shutil.which(t, path=path) is None]


def _tool(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    if found is None:
        raise GuestError(f"{name} not found; install the Debian package {BUILD_TOOLS[name]}")
    return found


def _run(args: Sequence[str | os.PathLike[str]], **kwargs: Any) -> str:
    """Run a tool, returning its stdout; a failure raises GuestError with its stderr."""
    argv = [os.fspath(a) for a in args]
    r = subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)
    if r.returncode != 0:
        raise GuestError(f"{' '.join(argv)} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return str(r.stdout)


def _deb_version(package: str) -> str:
    try:
        return _run(["dpkg-query", "-W", "-f", "${Version}", package]).strip()
    except (GuestError, FileNotFoundError):
        return "unknown"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# Kernel package
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KernelPackage:
    """A Debian kernel image package in the cache."""

    #: The package name, e.g. ``linux-image-6.1.0-57-amd64``.
    name: str
    #: The package's version, e.g. ``6.1.192-3``.
    version: str
    #: The downloaded .deb.
    deb: Path


def current_kernel_package() -> str:
    """The package ``linux-image-amd64`` depends on now (``apt-cache depends``). Runs
    ``apt-get update`` once when the lists are empty and we are root."""
    for attempt in range(2):
        r = subprocess.run(
            [_tool("apt-cache"), "depends", "linux-image-amd64"],
            capture_output=True,
            text=True,
            check=False,
        )
        m = re.search(r"Depends:\s*(linux-image-\S+-amd64)\s*$", r.stdout, re.MULTILINE)
        if m:
            return m.group(1)
        if attempt == 0 and os.geteuid() == 0:
            _run([_tool("apt-get"), "update", "-qq"])
    raise GuestError(
        "apt-cache does not know linux-image-amd64; run apt-get update (as root) first"
    )


def fetch_kernel(cache_dir: Path) -> KernelPackage:
    """Download the current kernel image package into ``cache_dir/debs`` unless it is there.

    Without apt (no lists, no network) the newest kernel already in the cache is used."""
    debs = cache_dir / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    try:
        name = current_kernel_package()
    except GuestError:
        cached = sorted(debs.glob("linux-image-*-amd64_*.deb"))
        if not cached:
            raise
        deb = cached[-1]
        pkg, version = deb.name.split("_")[:2]
        return KernelPackage(pkg, version, deb)
    found = sorted(debs.glob(f"{name}_*.deb"))
    if not found:
        with tempfile.TemporaryDirectory(dir=debs) as tmp:
            # As root apt drops to its _apt user, who may not write to the cache: stay root.
            sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
            _run([_tool("apt-get"), "download", "-q", *sandbox, name], cwd=tmp)
            got = sorted(Path(tmp).glob(f"{name}_*.deb"))
            if not got:
                raise GuestError(f"apt-get download {name} produced no .deb")
            os.replace(got[-1], debs / got[-1].name)
            # A new kernel replaces the old one: the cache keeps one.
            for old in debs.glob("linux-image-*.deb"):
                if old.name != got[-1].name:
                    old.unlink()
        found = sorted(debs.glob(f"{name}_*.deb"))
    deb = found[-1]
    return KernelPackage(name, deb.name.split("_")[1], deb)


# --------------------------------------------------------------------------------------------
# Kernel modules
# --------------------------------------------------------------------------------------------


def read_modinfo(path: Path) -> dict[str, list[str]]:
    """The ``key=value`` strings of a kernel module's ``.modinfo`` ELF section, by key."""
    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise GuestError(f"{path}: not a 64-bit little-endian ELF file")
    shoff = struct.unpack_from("<Q", data, 0x28)[0]
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize
        )
        return name, offset, size

    _, stroff, _ = section(shstrndx)
    info: dict[str, list[str]] = {}
    for i in range(shnum):
        name_off, offset, size = section(i)
        end = data.index(b"\0", stroff + name_off)
        if data[stroff + name_off : end] != b".modinfo":
            continue
        for entry in data[offset : offset + size].split(b"\0"):
            if b"=" in entry:
                key, _, value = entry.decode(errors="replace").partition("=")
                info.setdefault(key, []).append(value)
    return info


def _modname(name: str) -> str:
    return name.replace("-", "_")


def resolve_modules(tree: Path, wanted: Sequence[str]) -> list[Path]:
    """The ``.ko`` files under ``tree`` (``lib/modules/<version>``) to insmod, in load order:
    every dependency (``depends=``) and pre-soft-dependency (``softdep=pre:``, by module name or
    alias) before its user. Modules built into the kernel (``modules.builtin``) are left out."""
    builtin = set()
    builtin_file = tree / "modules.builtin"
    if builtin_file.exists():
        builtin = {_modname(Path(line).stem) for line in builtin_file.read_text().split()}
    files = {_modname(p.name.removesuffix(".ko")): p for p in tree.rglob("*.ko")}
    aliases: dict[str, list[str]] | None = None

    def by_alias(alias: str) -> str | None:
        nonlocal aliases
        if aliases is None:
            aliases = {}
            for mod, p in sorted(files.items()):
                for a in read_modinfo(p).get("alias", []):
                    aliases.setdefault(a, []).append(mod)
        return next(iter(aliases.get(alias, [])), None)

    # A soft dependency named by alias ("crc32c") is met by a module asked for that carries
    # the alias (crc32c_generic) before any other module is looked for.
    wanted_aliases: dict[str, str] = {}
    for mod in wanted:
        if _modname(mod) in files:
            for a in read_modinfo(files[_modname(mod)]).get("alias", []):
                wanted_aliases.setdefault(a, _modname(mod))
    order: list[str] = []
    visiting: set[str] = set()

    def visit(mod: str) -> None:
        mod = _modname(mod)
        if mod in order or mod in builtin:
            return
        if mod in visiting:
            raise GuestError(f"module dependency cycle through {mod}")
        if mod not in files:
            raise GuestError(f"module {mod} not found under {tree}")
        visiting.add(mod)
        info = read_modinfo(files[mod])
        for dep in ",".join(info.get("depends", [])).split(","):
            if dep:
                visit(dep)
        for soft in info.get("softdep", []):
            for name in soft.split("post:")[0].removeprefix("pre:").split():
                if _modname(name) in files or _modname(name) in builtin:
                    visit(name)
                else:
                    target = wanted_aliases.get(name) or by_alias(name)
                    if target is not None:
                        visit(target)
        visiting.discard(mod)
        order.append(mod)

    for mod in wanted:
        visit(mod)
    return [files[m] for m in order]


# --------------------------------------------------------------------------------------------
# Initramfs
# --------------------------------------------------------------------------------------------


class Cpio:
    """A cpio archive in the "newc" format the kernel unpacks as an initramfs, built in memory
    with fixed ownership (root) and mtime 0 so the same inputs give the same bytes."""

    def __init__(self) -> None:
        self._out = bytearray()
        self._ino = 1
        self._names: set[str] = set()

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        name = name.strip("/")
        if name in self._names:
            return
        self._names.add(name)
        parent = str(Path(name).parent)
        if parent != ".":
            self.directory(parent)
        encoded = name.encode() + b"\0"
        fields = (
            self._ino, mode, 0, 0, 2 if stat.S_ISDIR(mode) else 1, 0, len(data),
            0, 0, rdev[0], rdev[1], len(encoded), 0,
        )  # fmt: skip
        self._ino += 1
        self._out += b"070701" + "".join(f"{f:08x}" for f in fields).encode() + encoded
        self._pad()
        self._out += data
        self._pad()

    def _pad(self) -> None:
        self._out += b"\0" * (-len(self._out) % 4)

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        """The archive with its trailer, gzip-compressed (mtime 0)."""
        self._names.discard("TRAILER!!!")
        self._entry("TRAILER!!!", 0)
        return gzip.compress(bytes(self._out), compresslevel=9, mtime=0)


def shared_libraries(binary: Path) -> list[Path]:
    """The shared libraries ``binary`` loads, with the dynamic loader, as ``ldd`` names them."""
    libs: list[Path] = []
    for line in _run([_tool("ldd"), binary]).splitlines():
        m = re.match(r"\s*(?:\S+ => )?(/\S+) \(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    return libs


def _busybox() -> Path:
    busybox = Path(_tool("busybox")).resolve()
    r = subprocess.run(["ldd", str(busybox)], capture_output=True, text=True, check=False)
    if "not a dynamic executable" not in r.stdout + r.stderr:
        raise GuestError(f"{busybox} is dynamically linked; install busybox-static")
    return busybox


def host_binaries() -> dict[str, Path]:
    """The host's dynamically linked programs the initramfs carries, by their path there."""
    return {"sbin/e2fsck": Path(_tool("e2fsck")), "usr/sbin/qemu-ga": Path(_tool("qemu-ga"))}


def _binaries_digest() -> str:
    """A digest of the host programs copied into the guest and of every library they load."""
    h = hashlib.sha256()
    files = {name: path.resolve() for name, path in host_binaries().items()}
    for binary in list(files.values()):
        files.update({str(lib): lib.resolve() for lib in shared_libraries(binary)})
    for name in sorted(files):
        h.update(f"{name}\0{_file_digest(files[name])}\0".encode())
    return h.hexdigest()[:16]


def build_initramfs(modules: Sequence[Path], kernel_release: str) -> bytes:
    """The guest's initramfs (gzip'd newc cpio): busybox, the modules (load order in
    ``/etc/sitepair/modules``), e2fsck and qemu-ga with their libraries, the awk programs and
    ``/init``."""
    cpio = Cpio()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "data", "etc",
              "run"):  # fmt: skip
        cpio.directory(d)
    cpio.symlink("var/run", "/run")
    cpio.char_device("dev/console", 5, 1)
    cpio.char_device("dev/null", 1, 3, 0o666)
    cpio.file("bin/busybox", _busybox().read_bytes(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    cpio.file("init", INIT_SCRIPT.encode(), 0o755)
    for m in modules:
        cpio.file(f"lib/modules/{m.name}", m.read_bytes())
    cpio.file("etc/sitepair/modules", "".join(f"{m.name}\n" for m in modules).encode())
    cpio.file("etc/sitepair/kernel-release", f"{kernel_release}\n".encode())
    cpio.file("etc/sitepair/gen.awk", GEN_AWK.encode())
    cpio.file("etc/sitepair/verify.awk", VERIFY_AWK.encode())
    for name, binary in host_binaries().items():
        cpio.file(name, binary.resolve().read_bytes(), 0o755)
        for lib in shared_libraries(binary):
            cpio.file(str(lib), lib.resolve().read_bytes(), 0o755)
    cpio.file("etc/e2fsck.conf", E2FSCK_CONF.encode())
    cpio.symlink("etc/mtab", "/proc/self/mounts")
    return cpio.finish()


# --------------------------------------------------------------------------------------------
# Disk images
# --------------------------------------------------------------------------------------------


def _mtools_env() -> dict[str, str]:
    # mtools refuses images whose geometry it finds odd; ours is a plain file, not a floppy.
    return {**os.environ, "MTOOLS_SKIP_CHECK": "1"}


def build_boot_raw(path: Path, vmlinuz: Path, initrd: Path, size_mib: int = BOOT_DISK_MIB) -> None:
    """An unpartitioned FAT image with SYSLINUX in its boot sector, the kernel, the initramfs
    and ``syslinux.cfg``; bootable by SeaBIOS from any disk, virtio-blk included."""
    env = _mtools_env()
    _run([_tool("mkfs.fat"), "-C", "-n", "SITEPAIR", "-i", "5e7e0001", path, str(size_mib * 1024)])
    _run([_tool("syslinux"), "--install", path], env=env)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "syslinux.cfg"
        cfg.write_text(SYSLINUX_CFG)
        for src, name in ((vmlinuz, "vmlinuz"), (initrd, "initrd.gz"), (cfg, "syslinux.cfg")):
            _run([_tool("mcopy"), "-o", "-i", path, src, f"::/{name}"], env=env)


def build_data_raw(path: Path, size_mib: int = DATA_DISK_MIB) -> None:
    """The ext4 data disk: an empty ``log`` and ``records/``, 4 KiB blocks, itables initialised
    now (so the guest's lazy-init thread writes nothing behind the workload's back)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "root"
        (root / "records").mkdir(parents=True)
        (root / "log").write_bytes(b"")
        _run(
            [
                _tool("mkfs.ext4"), "-q", "-F", "-b", str(DATA_BLOCK_SIZE), "-L", "sitepair-data",
                "-E", "lazy_itable_init=0,lazy_journal_init=0", "-d", root, path, f"{size_mib}M",
            ]
        )  # fmt: skip


def to_vhdx(raw: Path, vhdx: Path, block_size: int | None = None) -> None:
    """Convert ``raw`` to a dynamic VHDX with ``sitepair.vdisk`` and check the result with
    ``qemu-img check`` and ``qemu-img compare`` (the independent reader)."""
    from sitepair.vdisk.ops import convert

    convert(raw, vhdx, format="vhdx", subformat="dynamic", block_size=block_size)
    _run([_tool("qemu-img"), "check", "-q", "-f", "vhdx", vhdx])
    _run([_tool("qemu-img"), "compare", "-q", "-f", "raw", "-F", "vhdx", raw, vhdx])


# --------------------------------------------------------------------------------------------
# The image
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GuestImage:
    """A built guest: templates to copy per VM, and the facts the build recorded."""

    #: The cache key (hash of every build input).
    key: str
    #: The folder holding the files below and ``manifest.json``.
    directory: Path
    #: The boot disk (FAT + SYSLINUX + kernel + initramfs) as VHDX; copy it per VM.
    boot_template: Path
    #: The empty data disk (ext4) as VHDX; copy it per VM.
    data_template: Path
    #: The same two disks as raw images (sparse), for comparisons and offline inspection.
    boot_raw: Path
    data_raw: Path
    #: What was built from what (versions, modules, sizes, build time).
    manifest: dict[str, Any]

    @property
    def kernel_release(self) -> str:
        return str(self.manifest["kernel_release"])

    @classmethod
    def build(cls, cache_dir: Path | None = None, *, force: bool = False) -> GuestImage:
        """The guest image for the current inputs, built into ``cache_dir`` (default:
        ``$SITEPAIR_GUEST_CACHE`` or ``<repo>/.cache/guest``) unless already there. Builders
        in several processes serialise on a lock file; a build is placed by rename, whole."""
        cache = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
        cache.mkdir(parents=True, exist_ok=True)
        with _locked(cache / ".lock"):
            kernel = fetch_kernel(cache)
            inputs = {
                "format": BUILD_FORMAT,
                "kernel_package": kernel.name,
                "kernel_version": kernel.version,
                "busybox": _deb_version("busybox-static"),
                "busybox_sha": _file_digest(_busybox()),
                "e2fsprogs": _deb_version("e2fsprogs"),
                "qemu_guest_agent": _deb_version("qemu-guest-agent"),
                "binaries_sha": _binaries_digest(),
                "syslinux": _deb_version("syslinux"),
                "init_sha": hashlib.sha256(INIT_SCRIPT.encode()).hexdigest()[:16],
                "awk_sha": hashlib.sha256((GEN_AWK + VERIFY_AWK).encode()).hexdigest()[:16],
                "syslinux_cfg": SYSLINUX_CFG,
                "e2fsck_conf": E2FSCK_CONF,
                "modules": list(WANTED_MODULES),
                "boot_mib": BOOT_DISK_MIB,
                "data_mib": DATA_DISK_MIB,
                "data_block_size": DATA_BLOCK_SIZE,
                "data_vhdx_block": DATA_VHDX_BLOCK,
            }
            key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
            directory = cache / "images" / key
            if force and directory.exists():
                shutil.rmtree(directory)
            if not (directory / "manifest.json").exists():
                _build_into(directory, kernel, inputs, key)
                # The cache keeps the current image only (copies made from older ones live on).
                for other in (cache / "images").iterdir():
                    if other.name != key and not other.name.startswith("."):
                        shutil.rmtree(other, ignore_errors=True)
            return cls.load(directory)

    @classmethod
    def load(cls, directory: Path) -> GuestImage:
        """A built image from its folder."""
        manifest = json.loads((directory / "manifest.json").read_text())
        return cls(
            key=manifest["key"],
            directory=directory,
            boot_template=directory / "boot.vhdx",
            data_template=directory / "data.vhdx",
            boot_raw=directory / "boot.raw",
            data_raw=directory / "data.raw",
            manifest=manifest,
        )

    def copy_disks(self, dest: Path, *, prefix: str = "") -> tuple[Path, Path]:
        """Fresh copies of the boot and data templates in ``dest``: ``(boot, data)``."""
        dest.mkdir(parents=True, exist_ok=True)
        boot = dest / f"{prefix}boot.vhdx"
        data = dest / f"{prefix}data.vhdx"
        shutil.copyfile(self.boot_template, boot)
        shutil.copyfile(self.data_template, data)
        return boot, data


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build_into(directory: Path, kernel: KernelPackage, inputs: dict[str, Any], key: str) -> None:
    started = time.monotonic()
    directory.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=directory.parent))
    try:
        unpacked = work / "deb"
        _run([_tool("dpkg-deb"), "-x", kernel.deb, unpacked])
        vmlinuz = next((unpacked / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        modules = resolve_modules(unpacked / "lib" / "modules" / release, WANTED_MODULES)
        out = work / "image"
        out.mkdir()
        shutil.copyfile(vmlinuz, out / "vmlinuz")
        (out / "initrd.gz").write_bytes(build_initramfs(modules, release))
        shutil.rmtree(unpacked)
        build_boot_raw(out / "boot.raw", out / "vmlinuz", out / "initrd.gz")
        build_data_raw(out / "data.raw")
        to_vhdx(out / "boot.raw", out / "boot.vhdx")
        to_vhdx(out / "data.raw", out / "data.vhdx", DATA_VHDX_BLOCK)
        manifest = {
            **inputs,
            "key": key,
            "kernel_release": release,
            "load_order": [m.name for m in modules],
            "cmdline": KERNEL_CMDLINE,
            "initrd_bytes": (out / "initrd.gz").stat().st_size,
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(out, directory)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Console log
# --------------------------------------------------------------------------------------------

_ACK = re.compile(r"SITEPAIR ACK (\d+) ([0-9a-f]{64})")
_VERIFY = re.compile(
    r"SITEPAIR VERIFY count=(\d+) last=(\d+) ok=([01]) torn=([01])(?: bad=(\d+) reason=(\w+))?"
)
_FSCK = re.compile(r"SITEPAIR FSCK preen=(\d+) check=(\d+) journal=([01]) verdict=(\w+)")
_SHUTDOWN = re.compile(r"SITEPAIR SHUTDOWN (clean|unclean.*)")
_QGA = re.compile(r"SITEPAIR QGA (started|failed)(?: .*)?")


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    """The guest's check of the records already on its data disk at boot."""

    #: Records in the log, gap-free from 1 and well-formed (the last such is ``last``).
    count: int
    last: int
    #: Every one of them present with its logged digest (and nothing malformed after them).
    ok: bool
    #: The log ended in a partial line (an unacknowledged append cut by a crash).
    torn: bool
    #: The first bad record and why (format, gap, missing, digest, nolog, nodisk, mount).
    bad: int | None = None
    reason: str | None = None


@dataclasses.dataclass(frozen=True)
class FsckReport:
    """The guest's e2fsck results for its data disk at boot."""

    #: ``e2fsck -p`` exit code (0 clean, 1 fixed, e.g. the journal replayed).
    preen: int
    #: ``e2fsck -fn`` exit code after that (0 = no errors).
    check: int
    #: The preen pass recovered the journal.
    journal: bool
    #: clean, replayed (journal recovered, then no errors), repaired, or errors.
    verdict: str

    @property
    def consistent(self) -> bool:
        """The filesystem checked clean, possibly after its journal was replayed."""
        return self.verdict in ("clean", "replayed")


class ConsoleLog:
    """A guest's serial log (QEMU ``-serial file:``), parsed on each call: only complete lines
    that start with ``SITEPAIR `` count. Each boot should have its own log file; where one file
    holds several boots, the reports are the last ones."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def text(self) -> str:
        try:
            return self.path.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def lines(self) -> list[str]:
        """The complete ``SITEPAIR`` lines, in order (a partial last line is left out)."""
        text = self.text()
        complete = text[: text.rfind("\n") + 1]
        return [line.rstrip("\r") for line in complete.split("\n") if line.startswith("SITEPAIR ")]

    def tail(self, n: int = 40) -> str:
        """The last ``n`` lines of the whole log, kernel messages included."""
        return "\n".join(self.text().replace("\r", "").splitlines()[-n:])

    def acks(self) -> list[tuple[int, str]]:
        out = []
        for line in self.lines():
            m = _ACK.fullmatch(line)
            if m:
                out.append((int(m.group(1)), m.group(2)))
        return out

    def last_ack(self) -> int:
        acks = self.acks()
        return acks[-1][0] if acks else 0

    def verify(self) -> VerifyReport | None:
        found = None
        for line in self.lines():
            m = _VERIFY.fullmatch(line)
            if m:
                found = VerifyReport(
                    count=int(m.group(1)),
                    last=int(m.group(2)),
                    ok=m.group(3) == "1",
                    torn=m.group(4) == "1",
                    bad=int(m.group(5)) if m.group(5) else None,
                    reason=m.group(6),
                )
        return found

    def fsck(self) -> FsckReport | None:
        found = None
        for line in self.lines():
            m = _FSCK.fullmatch(line)
            if m:
                found = FsckReport(
                    preen=int(m.group(1)),
                    check=int(m.group(2)),
                    journal=m.group(3) == "1",
                    verdict=m.group(4),
                )
        return found

    def ready(self) -> bool:
        return any(line.startswith("SITEPAIR READY") for line in self.lines())

    def shutdown(self) -> str | None:
        """``clean``, ``unclean reason=...``, or None before the guest shut down."""
        found = None
        for line in self.lines():
            m = _SHUTDOWN.fullmatch(line)
            if m:
                found = m.group(1)
        return found

    def shutdown_clean(self) -> bool:
        return self.shutdown() == "clean"

    def qga(self) -> str | None:
        """The guest agent's start: ``started``, ``failed`` (the line says why), or None
        before the guest got that far."""
        found = None
        for line in self.lines():
            m = _QGA.fullmatch(line)
            if m:
                found = m.group(1)
        return found

    def wait_for(
        self,
        predicate: Callable[[ConsoleLog], T | None],
        timeout: float,
        *,
        process: subprocess.Popen[bytes] | None = None,
        what: str | None = None,
        interval: float = 0.1,
    ) -> T:
        """Poll until ``predicate(self)`` is truthy and return its value. Raises GuestTimeout
        (with the log's tail) after ``timeout`` seconds, or at once if ``process`` exited
        while the predicate still fails."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate(self)
            if value:
                return value
            if process is not None and process.poll() is not None:
                value = predicate(self)
                if value:
                    return value
                raise GuestTimeout(
                    f"guest exited ({process.returncode}) before {what or 'the awaited state'}; "
                    f"console {self.path}:\n{self.tail()}"
                )
            if time.monotonic() >= deadline:
                raise GuestTimeout(
                    f"no {what or 'awaited state'} after {timeout:.0f} s; "
                    f"console {self.path}:\n{self.tail()}"
                )
            time.sleep(interval)


# --------------------------------------------------------------------------------------------
# Running a guest with QEMU directly (for the guest tests; the agent has its own backend)
# --------------------------------------------------------------------------------------------


def _opt(value: str | os.PathLike[str]) -> str:
    """A value inside a QEMU option list: commas are doubled."""
    return os.fspath(value).replace(",", ",,")


def guest_params(
    *, seed: int = 1, interval: float = 0.2, max_records: int = 0, writer: bool = True
) -> str:
    """The init's parameters as a string for the fw_cfg file (or a kernel command line)."""
    return (
        f"sitepair.seed={seed} sitepair.interval={interval:g} sitepair.max={max_records} "
        f"sitepair.writer={int(writer)}"
    )


def qemu_command(
    boot: Path,
    data: Path,
    *,
    console: Path,
    qmp_socket: Path,
    machine: str = "q35",
    memory_mib: int = 256,
    params: str | None = None,
    qga_socket: Path | None = None,
    extra: Sequence[str] = (),
) -> list[str]:
    """The QEMU command line for a guest: TCG, no network, no display, no reboot, the boot
    disk (first in boot order) and the data disk on virtio-blk through QEMU's vhdx driver, the
    serial console to a file and QMP on a unix socket. With ``qga_socket``, a virtio-serial
    port named ``org.qemu.guest_agent.0`` whose host end is that unix socket (QEMU listens),
    as the qemu backend gives its VMs: the guest then starts qemu-guest-agent on it."""
    argv = [
        QEMU_BINARY,
        "-machine", f"{machine},accel=tcg",
        "-m", str(memory_mib),
        "-smp", "1",
        "-nodefaults", "-display", "none", "-no-reboot", "-nic", "none",
        "-blockdev", f"driver=file,node-name=boot-file,filename={_opt(boot)}",
        "-blockdev", "driver=vhdx,node-name=boot,file=boot-file",
        "-device", "virtio-blk-pci,drive=boot,bootindex=1",
        "-blockdev", f"driver=file,node-name=data-file,filename={_opt(data)}",
        "-blockdev", "driver=vhdx,node-name=data,file=data-file",
        "-device", "virtio-blk-pci,drive=data",
        "-serial", f"file:{_opt(console)}",
        "-qmp", f"unix:{_opt(qmp_socket)},server=on,wait=off",
    ]  # fmt: skip
    if params:
        argv += ["-fw_cfg", f"name={FW_CFG_NAME},string={_opt(params)}"]
    if qga_socket is not None:
        argv += [
            "-chardev", f"socket,id=qga0,path={_opt(qga_socket)},server=on,wait=off",
            "-device", "virtio-serial-pci,id=vser0",
            "-device", f"virtserialport,chardev=qga0,name={QGA_PORT_NAME}",
        ]  # fmt: skip
    return argv + list(extra)


async def qmp_execute_async(
    socket: Path, command: str, arguments: dict[str, Any] | None = None
) -> Any:
    """Run one QMP command on a fresh connection (qemu.qmp's QMPClient); callers bound it
    with ``asyncio.timeout``."""
    from qemu.qmp import QMPClient

    client = QMPClient("sitepair-test")
    await client.connect(str(socket))
    try:
        return await client.execute(command, arguments)
    finally:
        await client.disconnect()


def qmp_execute(
    socket: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 10
) -> Any:
    """:func:`qmp_execute_async` from synchronous code, within ``timeout`` seconds."""

    async def bounded() -> Any:
        async with asyncio.timeout(timeout):
            return await qmp_execute_async(socket, command, arguments)

    return asyncio.run(bounded())


class GuestAgentError(GuestError):
    """qemu-guest-agent answered a command with an error."""


class GuestAgent:
    """A client of the guest's qemu-guest-agent through the host end of its virtio-serial
    channel (the unix socket QEMU listens on). The protocol: JSON objects, one a line, no
    greeting; :meth:`sync` sends ``guest-sync`` with a fresh id and skips every line until the
    reply with that id (replies left from an earlier client, a half-read line), then each
    :meth:`execute` reads its command's reply. It is the tests' own, independent of the agent's
    client (agent/hosts/qemu_guest_agent.py)."""

    def __init__(self, path: Path) -> None:
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._buf = b""
        try:
            self._sock.settimeout(10)
            self._sock.connect(os.fspath(path))
        except OSError:
            self._sock.close()
            raise

    def __enter__(self) -> GuestAgent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()

    def _send(self, command: str, arguments: dict[str, Any] | None) -> None:
        message: dict[str, Any] = {"execute": command}
        if arguments is not None:
            message["arguments"] = arguments
        self._sock.sendall(json.dumps(message).encode() + b"\n")

    def _reply(self, deadline: float, what: str) -> dict[str, Any] | None:
        """The next line as a JSON object; None for a line that is not one."""
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout(f"qemu-guest-agent did not answer {what} in time")
            self._sock.settimeout(left)
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                raise GuestError(f"the guest agent channel closed while waiting for {what}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        try:
            reply = json.loads(line.strip(b"\xff \r\t") or b"null")
        except ValueError:
            return None
        return reply if isinstance(reply, dict) else None

    def sync(self, timeout: float = 30) -> None:
        """``guest-sync``: wait until the agent answers this client's fresh id."""
        token = int.from_bytes(os.urandom(4), "big") >> 1 or 1  # fresh: not another's reply
        self._send("guest-sync", {"id": token})
        deadline = time.monotonic() + timeout
        while True:
            reply = self._reply(deadline, "guest-sync")
            if reply is not None and reply.get("return") == token:
                return

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, *, timeout: float = 60
    ) -> Any:
        """Run one command; its ``return`` value, or GuestAgentError with the agent's error."""
        self._send(command, arguments)
        deadline = time.monotonic() + timeout
        while True:
            reply = self._reply(deadline, command)
            if reply is None:
                continue
            if "error" in reply:
                raise GuestAgentError(f"{command}: {reply['error']}")
            if "return" in reply:
                return reply["return"]


@dataclasses.dataclass
class GuestVM:
    """A running QEMU guest started by :func:`launch_guest`. As a context manager it is
    killed on exit if still running."""

    process: subprocess.Popen[bytes]
    console: ConsoleLog
    qmp_socket: Path
    stderr_path: Path
    started: float
    #: The host end of the guest agent's channel (``launch_guest(qga=True)``), else None.
    qga_socket: Path | None = None

    def __enter__(self) -> GuestVM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.kill()

    def running(self) -> bool:
        return self.process.poll() is None

    def qmp(self, command: str, arguments: dict[str, Any] | None = None) -> Any:
        return qmp_execute(self.qmp_socket, command, arguments)

    def wait_for(self, predicate: Callable[[ConsoleLog], T | None], timeout: float, what: str) -> T:
        return self.console.wait_for(predicate, timeout, process=self.process, what=what)

    def agent(self, timeout: float = 30) -> GuestAgent:
        """A connection to the guest's qemu-guest-agent, synced (``guest-sync``) within
        ``timeout`` seconds; use it as a context manager."""
        if self.qga_socket is None:
            raise GuestError("this guest was launched without a guest agent channel (qga=True)")
        agent = GuestAgent(self.qga_socket)
        try:
            agent.sync(timeout)
        except BaseException:
            agent.close()
            raise
        return agent

    def wait_ready(self, timeout: float = 120) -> float:
        """Wait for ``SITEPAIR READY``; the seconds from launch to it."""
        self.wait_for(ConsoleLog.ready, timeout, "SITEPAIR READY")
        return time.monotonic() - self.started

    def wait_acks(self, n: int, timeout: float = 120) -> list[tuple[int, str]]:
        """Wait until ``n`` records were acknowledged in this boot; all the ACKs so far."""

        def enough(console: ConsoleLog) -> list[tuple[int, str]] | None:
            acks = console.acks()
            return acks if len(acks) >= n else None

        return self.wait_for(enough, timeout, f"{n} ACKs")

    def powerdown(self, timeout: float = 60) -> int:
        """Press the ACPI power button (QMP ``system_powerdown``) and wait for QEMU to exit;
        its exit code."""
        self.qmp("system_powerdown")
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise GuestTimeout(
                f"guest did not power off within {timeout:.0f} s; console:\n{self.console.tail()}"
            ) from None

    def kill(self) -> None:
        """SIGKILL QEMU (a power cut for the guest: what reached QEMU's files stays) and reap
        it. Idempotent."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(30)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""


def launch_guest(
    boot: Path,
    data: Path,
    workdir: Path,
    *,
    name: str = "guest",
    machine: str = "q35",
    memory_mib: int = 256,
    seed: int = 1,
    interval: float = 0.2,
    max_records: int = 0,
    writer: bool = True,
    qga: bool = False,
    extra: Sequence[str] = (),
) -> GuestVM:
    """Start QEMU on ``boot`` and ``data`` (VHDX files the guest may change); the console log,
    QMP socket and QEMU's stderr go in ``workdir`` as ``<name>.console`` etc. A console file
    left from an earlier boot is replaced. With ``qga``, the VM gets the guest agent's
    virtio-serial channel, its host end the unix socket ``<name>.qga`` (``GuestVM.agent``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    console = workdir / f"{name}.console"
    qmp_socket = workdir / f"{name}.qmp"
    qga_socket = workdir / f"{name}.qga" if qga else None
    stderr_path = workdir / f"{name}.stderr"
    for p in (console, qmp_socket, qga_socket):
        if p is not None:
            p.unlink(missing_ok=True)
    for sock in (qmp_socket, qga_socket):
        if sock is not None and len(os.fsencode(sock)) > 100:
            raise GuestError(f"{sock}: too long for a unix socket path")
    argv = qemu_command(
        boot,
        data,
        console=console,
        qmp_socket=qmp_socket,
        machine=machine,
        memory_mib=memory_mib,
        params=guest_params(seed=seed, interval=interval, max_records=max_records, writer=writer),
        qga_socket=qga_socket,
        extra=extra,
    )
    with stderr_path.open("wb") as err:
        process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err)
    vm = GuestVM(
        process, ConsoleLog(console), qmp_socket, stderr_path, time.monotonic(), qga_socket
    )
    deadline = time.monotonic() + 10
    while not qmp_socket.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            vm.kill()
            raise GuestError(f"QEMU did not start: {' '.join(argv)}\n{vm.stderr()}")
        time.sleep(0.05)
    return vm


# --------------------------------------------------------------------------------------------
# Offline inspection of a data disk
# --------------------------------------------------------------------------------------------


def record_offsets(data_disk: Path, seq: int) -> list[int]:
    """Byte offsets in the data disk (any format ``sitepair.vdisk`` opens) of the blocks of
    record ``seq``'s file, from ``debugfs -R 'blocks ...'`` on a raw copy."""
    from sitepair.vdisk.ops import convert

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "data.raw"
        convert(data_disk, raw, format="raw", subformat="fixed")
        out = _run([_tool("debugfs"), "-R", f"blocks /records/{seq}", raw])
    blocks = [int(b) for b in out.split()]
    if not blocks:
        raise GuestError(f"record {seq} has no blocks in {data_disk}")
    return [b * DATA_BLOCK_SIZE for b in blocks]


def corrupt_record(data_disk: Path, seq: int, *, at: int = 100) -> None:
    """Flip one byte of record ``seq``'s data, ``at`` bytes into the file, writing through
    ``sitepair.vdisk`` into the image (the guest must be stopped)."""
    from sitepair.vdisk import open_disk

    offset = record_offsets(data_disk, seq)[at // DATA_BLOCK_SIZE] + at % DATA_BLOCK_SIZE
    with open_disk(data_disk) as disk:
        byte = disk.read(offset, 1)
        disk.write(offset, bytes([byte[0] ^ 0x01]))
        disk.flush()


def check_data_disk(data_disk: Path, seed: int) -> list[tuple[int, str]]:
    """Check a data disk offline (the guest stopped, its filesystem cleanly unmounted), as the
    guest's boot-time verification would and more strictly: ``e2fsck -fn`` finds nothing, the
    log is complete, gap-free from 1, and every record's bytes are exactly the generator's for
    ``seed`` with the logged digest. Reads a raw copy (``sitepair.vdisk``) with ``debugfs``, no
    mount. The log's entries ``(seq, digest)``; GuestError on the first fault."""
    from sitepair.vdisk.ops import convert

    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "data.raw"
        convert(data_disk, raw, format="raw", subformat="fixed")
        conf = Path(tmp) / "e2fsck.conf"
        conf.write_text(E2FSCK_CONF)
        env = {**os.environ, "E2FSCK_CONFIG": str(conf)}
        _run([_tool("e2fsck"), "-fn", raw], env=env)
        out = Path(tmp) / "out"
        out.mkdir()
        _run([_tool("debugfs"), "-R", f"rdump /records {out}", raw])
        _run([_tool("debugfs"), "-R", f"dump /log {out / 'log'}", raw])
        text = (out / "log").read_text()
        if text and not text.endswith("\n"):
            raise GuestError(f"{data_disk}: the log ends in a partial line")
        entries = []
        for n, line in enumerate(text.splitlines(), 1):
            seq, _, digest = line.partition(" ")
            if seq != str(n):
                raise GuestError(f"{data_disk}: log line {n} is {line!r}")
            data = (out / "records" / seq).read_bytes()
            if data != record_bytes(seed, n) or hashlib.sha256(data).hexdigest() != digest:
                raise GuestError(f"{data_disk}: record {n} differs from the generator's or log's")
            entries.append((n, digest))
        return entries
