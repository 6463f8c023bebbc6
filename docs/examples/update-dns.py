"""Recovery-plan script action (Python flavour): update a DNS record with nsupdate.

Same contract as update-dns.sh: arguments NAME ADDRESS [TTL]; the agent runs ``.py`` scripts
with its own Python. Copy it into <agent home>/scripts/ on the recovery-site hosts.
"""

import os
import subprocess
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print("usage: update-dns.py NAME ADDRESS [TTL]", file=sys.stderr)
        return 2
    name, address = sys.argv[1], sys.argv[2]
    ttl = sys.argv[3] if len(sys.argv) > 3 else "60"
    if os.environ.get("SITEPAIR_FAILOVER_TYPE") == "test":
        print(f"test failover: leaving {name} alone")
        return 0
    server = os.environ.get("DNS_SERVER", "127.0.0.1")
    key = os.environ.get("DNS_KEY", "/etc/sitepair/dns.key")
    cmd = ["nsupdate"] + (["-k", key] if os.access(key, os.R_OK) else [])
    script = f"server {server}\nupdate delete {name} A\nupdate add {name} {ttl} A {address}\nsend\n"
    done = subprocess.run(cmd, input=script, text=True, capture_output=True, check=False)
    print(done.stdout + done.stderr, end="")
    if done.returncode != 0:
        print(f"nsupdate failed with status {done.returncode}", file=sys.stderr)
        return done.returncode
    print(f"{name} now points at {address}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
