#!/usr/bin/env bash
# Set up everything sitepair needs on a fresh Debian machine, idempotently:
#   - Debian packages the tests and the demo use (qemu-utils, libvhdi-utils, rsync, iproute2,
#     postgresql, chromium), installed with apt-get when running as root and missing;
#   - a virtual environment in .venv with the project (editable) and its dev tools, pinned by
#     requirements/constraints.txt.
# Re-running is cheap: the venv step is skipped while pyproject.toml and the constraints are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# qemu-system-x86 and the rest of the second group: the test guest (tests/support/guest.py)
# is built from Debian packages (busybox, e2fsck, a FAT boot disk with SYSLINUX) and booted by
# QEMU; apt (apt-get download) fetches its kernel package at test time.
# chromium and libnss3-tools: the dashboard's browser tests (tests/web/browser) drive Debian's
# headless Chromium with Playwright (`playwright install` cannot download browsers here) and
# trust the vault CA in the browser's NSS database with certutil, as an operator would.
DEBS=(qemu-utils libvhdi-utils rsync iproute2 postgresql make
      qemu-system-x86 busybox-static e2fsprogs dosfstools mtools syslinux syslinux-common apt
      qemu-guest-agent
      chromium libnss3-tools)
missing=()
for p in "${DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "setup: installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "setup: missing Debian packages (${missing[*]}); install them with apt-get as root." >&2
        echo "setup: tests that need them will be skipped with a reason." >&2
    fi
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
    for c in python3.11 python3.12 python3.13 python3; do
        if command -v "$c" >/dev/null && "$c" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
            PY=$c; break
        fi
    done
fi
[ -n "$PY" ] || { echo "setup: Python 3.11 or newer is required" >&2; exit 1; }

stamp_src=$(cat pyproject.toml requirements/constraints.txt | sha256sum | cut -c1-16)
if [ -x .venv/bin/python ] && [ "$(cat .venv/.setup-stamp 2>/dev/null)" = "$stamp_src" ]; then
    exit 0
fi
echo "setup: creating .venv with $("$PY" --version)"
"$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -c requirements/constraints.txt -e '.[dev]'
echo "$stamp_src" > .venv/.setup-stamp
echo "setup: done"
