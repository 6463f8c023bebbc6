"""``python -m tests.harness``: run cross-site scenarios and print a report.

python -m tests.harness list
python -m tests.harness run walkthrough failback --mode loopback --report out.json
python -m tests.harness run all --seed 7
python -m tests.harness run rpo-hold --mode netns --profile wan
python -m tests.harness run walkthrough failback --store postgresql
python -m tests.harness run walkthrough failback site-loss --backend qemu
python -m tests.harness soak --minutes 60 --kills 200 --report soak.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tests.harness import guest_scenarios
from tests.harness.network import PROFILES
from tests.harness.report import table, write_json
from tests.harness.runner import run_scenario
from tests.harness.scenarios import SCENARIOS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.harness", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="list the scenarios")
    r = sub.add_parser("run", help="run scenarios")
    r.add_argument("scenarios", nargs="+", help=f"scenario names or 'all' ({', '.join(SCENARIOS)})")
    s = sub.add_parser("soak", help="the kill soak and RPO hold for as long as asked")
    s.add_argument("--minutes", type=float, default=60.0)
    s.add_argument("--kills", type=int, default=200)
    s.add_argument(
        "--rpo-profiles",
        default="lan,metro,wan",
        help="WAN profiles the RPO hold runs on, one after another (comma-separated)",
    )
    for sp in (r, s):
        sp.add_argument("--mode", choices=["loopback", "netns"], default="loopback")
        sp.add_argument("--seed", type=int, default=1)
        sp.add_argument(
            "--profile",
            choices=sorted(PROFILES),
            default="lan",
            help="the inter-site link for the whole run (docs/harness-network.md)",
        )
        sp.add_argument(
            "--store",
            choices=["sqlite", "postgresql"],
            default="sqlite",
            help="the broker's store: its embedded SQLite, or a throwaway PostgreSQL server",
        )
        sp.add_argument(
            "--backend",
            choices=["directory", "qemu"],
            default="directory",
            help="the hosts' backend: directory (the harness writes into VM folders), or qemu "
            "(QEMU under TCG, each VM a real test guest; scenarios without a real-guest "
            "version report SKIP)",
        )
        sp.add_argument("--report", type=Path, help="write the report as JSON")
        sp.add_argument(
            "--work", type=Path, help="keep the run's folders here (default: a temp dir)"
        )
    args = p.parse_args(argv)
    if args.command == "list":
        for name, fn in SCENARIOS.items():
            backends = "directory, qemu" if name in guest_scenarios.SCENARIOS else "directory"
            print(f"{name:<12} {backends:<15}  {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if args.command == "soak":
        # Two thirds of the time for the kills, the rest for the RPO hold on each WAN profile.
        seconds = args.minutes * 60
        plan: list[tuple[str, dict[str, Any]]] = [
            ("kill-soak", {"kills": args.kills, "soak": seconds * 2 / 3})
        ]
        rpo_profiles = [x.strip() for x in args.rpo_profiles.split(",") if x.strip()]
        bad = [x for x in rpo_profiles if x not in PROFILES]
        if bad or not rpo_profiles:
            p.error(f"--rpo-profiles: unknown {', '.join(bad)!r}; choose from {sorted(PROFILES)}")
        plan += [
            ("rpo-hold", {"soak": max(75.0, seconds / 3 / len(rpo_profiles)), "profile": p})
            for p in rpo_profiles
        ]
    else:
        names = list(SCENARIOS) if args.scenarios == ["all"] else args.scenarios
        unknown = [n for n in names if n not in SCENARIOS]
        if unknown:
            p.error(f"unknown scenario(s): {', '.join(unknown)}")
        plan = [(n, {}) for n in names]
    reports = []
    for name, extra in plan:
        profile = str(extra.pop("profile", args.profile))
        print(
            f"== {name} ({args.mode}, {profile}, {args.store}, {args.backend}, seed {args.seed})",
            flush=True,
        )
        reports.append(
            run_scenario(
                name,
                mode=args.mode,
                seed=args.seed,
                work=args.work,
                profile=profile,
                store=args.store,
                backend=args.backend,
                **extra,
            )
        )
        print(table(reports[-1:]), flush=True)
    print()
    print(table(reports))
    if args.report:
        write_json(reports, args.report)
    return 0 if all(r.passed or r.skipped for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
