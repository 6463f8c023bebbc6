"""The wire contract of proto/sitepair/v1, as a committed baseline, and what breaks it.

``describe`` turns the descriptors compiled into ``sitepair/v1`` (``FileDescriptorProto``) into
a plain, sorted JSON document: for every message (nested ones by their full name) each field's
number, name, type, label and oneof, and the reserved numbers and names; every enum's values and
reservations; every service's methods with their types and streaming. ``breaking_changes``
compares a baseline with the current contract and names each change that an agent or broker of
the other version would misread; additions are not changes.

``tests/test_proto_compat.py`` fails on any breaking change against
``proto/compat/sitepair-v1.json``. When a break is intended (a new protocol version), run::

    python scripts/proto_baseline.py          # rewrite the baseline from sitepair/v1
    python scripts/proto_baseline.py --check  # exit 1, listing the breaking changes, if any

together with raising ``sitepair.PROTOCOL_VERSION`` and the broker's ``MIN_AGENT_PROTOCOL``
(docs/operations.md, "Upgrading").
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
BASELINE = ROOT / "proto" / "compat" / "sitepair-v1.json"

Doc = dict[str, Any]

_TYPES = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Type.items()}
_LABELS = {v: k for k, v in descriptor_pb2.FieldDescriptorProto.Label.items()}


def current_files() -> list[descriptor_pb2.FileDescriptorProto]:
    """The FileDescriptorProto of every module compiled into sitepair/v1."""
    from sitepair.v1 import (
        admin_pb2,
        common_pb2,
        control_pb2,
        enrollment_pb2,
        replication_pb2,
    )

    files = []
    for module in (admin_pb2, common_pb2, control_pb2, enrollment_pb2, replication_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        files.append(fdp)
    return files


def _ranges(ranges: Iterable[Any]) -> list[list[int]]:
    # Reserved ranges are [start, end): stored as such.
    return sorted([r.start, r.end] for r in ranges)


def _message(msg: descriptor_pb2.DescriptorProto, prefix: str, out: Doc, enums: Doc) -> None:
    name = f"{prefix}.{msg.name}"
    oneofs = [o.name for o in msg.oneof_decl]
    fields = {}
    for f in msg.field:
        fields[str(f.number)] = {
            "name": f.name,
            "type": _TYPES[f.type],
            "type_name": f.type_name,
            "label": _LABELS[f.label],
            # A proto3 `optional` is a synthetic oneof: presence, not membership.
            "oneof": oneofs[f.oneof_index]
            if f.HasField("oneof_index") and not f.proto3_optional
            else "",
            "optional": f.proto3_optional,
        }
    out[name] = {
        "fields": dict(sorted(fields.items(), key=lambda kv: int(kv[0]))),
        "reserved_ranges": _ranges(msg.reserved_range),
        "reserved_names": sorted(msg.reserved_name),
    }
    for nested in msg.nested_type:
        _message(nested, name, out, enums)
    for enum in msg.enum_type:
        _enum(enum, name, enums)


def _enum(enum: descriptor_pb2.EnumDescriptorProto, prefix: str, out: Doc) -> None:
    out[f"{prefix}.{enum.name}"] = {
        "values": {str(v.number): v.name for v in sorted(enum.value, key=lambda v: v.number)},
        # Enum reserved ranges are inclusive [start, end]; stored as [start, end + 1).
        "reserved_ranges": sorted([r.start, r.end + 1] for r in enum.reserved_range),
        "reserved_names": sorted(enum.reserved_name),
    }


def describe(files: Sequence[descriptor_pb2.FileDescriptorProto]) -> Doc:
    """The wire contract of ``files`` as a JSON-ready document."""
    messages: Doc = {}
    enums: Doc = {}
    services: Doc = {}
    for fdp in files:
        prefix = f".{fdp.package}" if fdp.package else ""
        for msg in fdp.message_type:
            _message(msg, prefix, messages, enums)
        for enum in fdp.enum_type:
            _enum(enum, prefix, enums)
        for svc in fdp.service:
            services[f"{prefix}.{svc.name}"] = {
                m.name: {
                    "input": m.input_type,
                    "output": m.output_type,
                    "client_streaming": m.client_streaming,
                    "server_streaming": m.server_streaming,
                }
                for m in sorted(svc.method, key=lambda m: m.name)
            }
    return {
        "files": sorted(f.name for f in files),
        "messages": dict(sorted(messages.items())),
        "enums": dict(sorted(enums.items())),
        "services": dict(sorted(services.items())),
    }


def _reserved(number: int, ranges: Sequence[Sequence[int]]) -> bool:
    return any(start <= number < end for start, end in ranges)


def _fields(old: Doc, new: Doc) -> list[str]:
    problems = []
    for name, was in old["messages"].items():
        now = new["messages"].get(name)
        if now is None:
            problems.append(f"message {name} removed")
            continue
        for number, f in was["fields"].items():
            g = now["fields"].get(number)
            where = f"{name} field {number} ({f['name']})"
            if g is None:
                if not _reserved(int(number), now["reserved_ranges"]):
                    problems.append(f"{where} removed without reserving its number")
                continue
            if (g["type"], g["type_name"]) != (f["type"], f["type_name"]):
                was_t, now_t = f["type_name"] or f["type"], g["type_name"] or g["type"]
                problems.append(f"{where} changed type from {was_t} to {now_t}")
            if g["label"] != f["label"] or g["optional"] != f["optional"]:
                problems.append(f"{where} changed label from {f['label']} to {g['label']}")
            if g["name"] != f["name"]:
                problems.append(f"{where} renamed to {g['name']}")
            if g["oneof"] != f["oneof"]:
                problems.append(
                    f"{where} moved from oneof {f['oneof'] or '(none)'} to {g['oneof'] or '(none)'}"
                )
        for number, g in now["fields"].items():
            if number not in was["fields"] and _reserved(int(number), was["reserved_ranges"]):
                problems.append(f"{name} field {number} ({g['name']}) reuses a reserved number")
            if g["name"] in was["reserved_names"]:
                problems.append(f"{name} field {number} reuses the reserved name {g['name']}")
        for start, end in was["reserved_ranges"]:
            for n in range(start, min(end, start + 1000)):
                if not _reserved(n, now["reserved_ranges"]) and str(n) not in now["fields"]:
                    problems.append(f"{name} no longer reserves field number {n}")
                    break
    return problems


def _enums(old: Doc, new: Doc) -> list[str]:
    problems = []
    for name, was in old["enums"].items():
        now = new["enums"].get(name)
        if now is None:
            problems.append(f"enum {name} removed")
            continue
        for number, value in was["values"].items():
            got = now["values"].get(number)
            if got is None:
                if not _reserved(int(number), now["reserved_ranges"]):
                    problems.append(
                        f"enum {name} value {number} ({value}) removed without reserving it"
                    )
            elif got != value:
                problems.append(f"enum {name} value {number} renamed from {value} to {got}")
        for number, value in now["values"].items():
            if number not in was["values"] and _reserved(int(number), was["reserved_ranges"]):
                problems.append(f"enum {name} value {number} ({value}) reuses a reserved number")
            if value in was["reserved_names"]:
                problems.append(f"enum {name} value {number} reuses the reserved name {value}")
    return problems


def _services(old: Doc, new: Doc) -> list[str]:
    problems = []
    for name, methods in old["services"].items():
        now = new["services"].get(name)
        if now is None:
            problems.append(f"service {name} removed")
            continue
        for method, was in methods.items():
            got = now.get(method)
            if got is None:
                problems.append(f"method {name}.{method} removed")
            elif got != was:
                changed = ", ".join(
                    f"{k} {was[k]} -> {got[k]}" for k in sorted(was) if was[k] != got.get(k)
                )
                problems.append(f"method {name}.{method} changed: {changed}")
    return problems


def breaking_changes(old: Doc, new: Doc) -> list[str]:
    """Every change from the contract ``old`` to ``new`` that breaks the wire, one line each."""
    return _fields(old, new) + _enums(old, new) + _services(old, new)


def render(doc: Doc) -> str:
    """The document as committed: nested by name, each field, method or list on one line, so a
    change to the contract is a readable diff."""

    def flat(value: Any) -> bool:
        if isinstance(value, dict):
            return all(not isinstance(v, (dict, list)) for v in value.values())
        return isinstance(value, list) and all(not isinstance(v, dict) for v in value)

    def dump(value: Any, indent: str) -> str:
        if not isinstance(value, dict) or flat(value) or not value:
            return json.dumps(value)
        inner = indent + " "
        items = [f"{inner}{json.dumps(k)}: {dump(v, inner)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"

    return dump(doc, "") + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--check",
        action="store_true",
        help="compare instead of writing: exit 1 listing breaking changes",
    )
    args = p.parse_args(argv)
    current = describe(current_files())
    if args.check:
        problems = breaking_changes(json.loads(BASELINE.read_text(encoding="utf-8")), current)
        for line in problems:
            print(f"breaking: {line}")
        return 1 if problems else 0
    BASELINE.parent.mkdir(parents=True, exist_ok=True)
    BASELINE.write_text(render(current), encoding="utf-8")
    print(f"wrote {BASELINE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
