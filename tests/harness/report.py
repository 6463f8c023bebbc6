"""What a scenario run produced: passed or failed, RPO, bytes, faults, checks; table and JSON."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any


@dataclasses.dataclass
class Check:
    what: str
    ok: bool
    detail: str = ""


@dataclasses.dataclass
class ScenarioReport:
    name: str
    mode: str
    seed: int
    #: The inter-site link's WAN profile (tests/harness/network/wan.py).
    profile: str = "lan"
    #: The broker's store: "sqlite" or "postgresql".
    store: str = "sqlite"
    #: The hosts' backend: "directory" (the harness writes) or "qemu" (real guests).
    backend: str = "directory"
    passed: bool = False
    #: Why the scenario could not run here (root needed, ...); a skip is not a pass.
    skipped: str = ""
    seconds: float = 0.0
    worst_rpo: float = 0.0
    bytes_moved: int = 0
    faults: list[str] = dataclasses.field(default_factory=list)
    checks: list[Check] = dataclasses.field(default_factory=list)
    errors: list[str] = dataclasses.field(default_factory=list)
    details: dict[str, Any] = dataclasses.field(default_factory=dict)

    def check(self, what: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(what, ok, detail))
        if not ok:
            self.errors.append(f"{what}: {detail}")
        return ok

    @property
    def mismatches(self) -> int:
        return sum(1 for c in self.checks if not c.ok)

    def as_dict(self) -> dict[str, Any]:
        doc = dataclasses.asdict(self)
        doc["mismatches"] = self.mismatches
        return doc


def table(reports: list[ScenarioReport]) -> str:
    headers = [
        "scenario",
        "mode",
        "link",
        "store",
        "backend",
        "result",
        "time",
        "worst RPO",
        "MB moved",
        "faults",
        "checks",
        "first problem",
    ]
    rows = [
        [
            r.name,
            r.mode,
            r.profile,
            "pg" if r.store == "postgresql" else r.store,
            "dir" if r.backend == "directory" else r.backend,
            "SKIP" if r.skipped else "PASS" if r.passed else "FAIL",
            f"{r.seconds:.0f}s",
            f"{r.worst_rpo:.1f}s" if r.worst_rpo else "-",
            f"{r.bytes_moved / 1e6:.1f}",
            str(len(r.faults)),
            f"{len(r.checks) - r.mismatches}/{len(r.checks)}",
            (r.errors[0][:60] if r.errors else r.skipped[:60]),
        ]
        for r in reports
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    return "\n".join(lines)


def write_json(reports: list[ScenarioReport], path: Path) -> None:
    path.write_text(json.dumps([r.as_dict() for r in reports], indent=2) + "\n")
