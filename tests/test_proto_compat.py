"""The wire contract of proto/sitepair/v1 against its committed baseline
(``proto/compat/sitepair-v1.json``, written by ``scripts/proto_baseline.py``).

An agent and a broker of different releases interoperate only if neither misreads the other's
messages: a field number given another type, a field or enum value dropped without reserving its
number, a reserved number used again, a method removed or given other types. This test fails,
naming each such change, until the change is undone or the baseline is rewritten together with
a new protocol version (docs/operations.md, "Upgrading"). Additions pass.

The second half shows the check can fail: breaking edits applied to a copy of a compiled
FileDescriptorProto are each reported, and additions are not.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parent.parent
FDP = descriptor_pb2.FieldDescriptorProto


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "proto_baseline", ROOT / "scripts" / "proto_baseline.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


pb = _load_script()


def test_the_current_protos_keep_the_baseline_contract() -> None:
    baseline = json.loads(pb.BASELINE.read_text(encoding="utf-8"))
    current = pb.describe(pb.current_files())
    problems = pb.breaking_changes(baseline, current)
    assert not problems, (
        "breaking changes to proto/sitepair/v1 (undo them, or bump the protocol version and "
        "rewrite the baseline: docs/operations.md, Upgrading):\n  " + "\n  ".join(problems)
    )
    # The baseline covers the whole contract (five files, the three services).
    assert len(baseline["files"]) == 5
    assert {".sitepair.v1.Admin", ".sitepair.v1.Control"} <= set(baseline["services"])


# -- the check can fail ---------------------------------------------------------------------


def control_file() -> descriptor_pb2.FileDescriptorProto:
    (fdp,) = [f for f in pb.current_files() if f.name == "sitepair/v1/control.proto"]
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(fdp)
    return copy


def message(fdp: descriptor_pb2.FileDescriptorProto, name: str) -> descriptor_pb2.DescriptorProto:
    (msg,) = [m for m in fdp.message_type if m.name == name]
    return msg


def field(msg: descriptor_pb2.DescriptorProto, number: int) -> descriptor_pb2.FieldDescriptorProto:
    (f,) = [f for f in msg.field if f.number == number]
    return f


def remove_field(msg: descriptor_pb2.DescriptorProto, number: int) -> None:
    keep = [f for f in msg.field if f.number != number]
    del msg.field[:]
    msg.field.extend(keep)


def enum(fdp: descriptor_pb2.FileDescriptorProto, name: str) -> descriptor_pb2.EnumDescriptorProto:
    (e,) = [e for e in fdp.enum_type if e.name == name]
    return e


def change_type(f: descriptor_pb2.FileDescriptorProto) -> None:
    field(message(f, "Hello"), 3).type = FDP.TYPE_STRING  # protocol_version: uint32 -> string


def remove_unreserved(f: descriptor_pb2.FileDescriptorProto) -> None:
    remove_field(message(f, "Hello"), 2)


def reuse_reserved(f: descriptor_pb2.FileDescriptorProto) -> None:
    message(f, "CommandAck").field.add(name="result_text", number=4, type=FDP.TYPE_STRING)


def make_repeated(f: descriptor_pb2.FileDescriptorProto) -> None:
    field(message(f, "Hello"), 2).label = FDP.LABEL_REPEATED


def leave_oneof(f: descriptor_pb2.FileDescriptorProto) -> None:
    field(message(f, "AgentMessage"), 5).ClearField("oneof_index")


def rename_field(f: descriptor_pb2.FileDescriptorProto) -> None:
    field(message(f, "Hello"), 2).name = "version"


def remove_enum_value(f: descriptor_pb2.FileDescriptorProto) -> None:
    e = enum(f, "Role")
    keep = [v for v in e.value if v.number != 1]
    del e.value[:]
    e.value.extend(keep)


def rename_enum_value(f: descriptor_pb2.FileDescriptorProto) -> None:
    e = enum(f, "Role")
    (v,) = [v for v in e.value if v.number == 1]
    v.name = "ROLE_RENAMED"


def remove_method(f: descriptor_pb2.FileDescriptorProto) -> None:
    (svc,) = f.service
    keep = [m for m in svc.method if m.name != "Renew"]
    del svc.method[:]
    svc.method.extend(keep)


def change_method_types(f: descriptor_pb2.FileDescriptorProto) -> None:
    (svc,) = f.service
    (m,) = [m for m in svc.method if m.name == "IssueTicket"]
    m.output_type = ".sitepair.v1.RenewResponse"
    m.server_streaming = True


def unreserve(f: descriptor_pb2.FileDescriptorProto) -> None:
    msg = message(f, "CommandAck")
    keep = [r for r in msg.reserved_range if r.start != 4]
    del msg.reserved_range[:]
    msg.reserved_range.extend(keep)


BREAKS: dict[str, tuple[Callable[[descriptor_pb2.FileDescriptorProto], None], str]] = {
    "type": (change_type, "Hello field 3 (protocol_version) changed type from TYPE_UINT32"),
    "removed": (remove_unreserved, "Hello field 2 (agent_version) removed without reserving"),
    "reserved reused": (reuse_reserved, "CommandAck field 4 (result_text) reuses a reserved"),
    "label": (make_repeated, "Hello field 2 (agent_version) changed label"),
    "oneof": (leave_oneof, "AgentMessage field 5 (replication) moved from oneof body"),
    "renamed": (rename_field, "Hello field 2 (agent_version) renamed to version"),
    "enum removed": (remove_enum_value, "Role value 1 (ROLE_PRIMARY) removed without reserving"),
    "enum renamed": (rename_enum_value, "Role value 1 renamed from ROLE_PRIMARY to ROLE_RENAMED"),
    "method removed": (remove_method, "method .sitepair.v1.Control.Renew removed"),
    "method types": (change_method_types, "method .sitepair.v1.Control.IssueTicket changed"),
    "unreserved": (unreserve, "CommandAck no longer reserves field number 4"),
}


def changes_after(edit: Callable[[descriptor_pb2.FileDescriptorProto], None]) -> list[str]:
    files = pb.current_files()
    before = pb.describe(files)
    edited = control_file()
    edit(edited)
    after = pb.describe([edited if f.name == edited.name else f for f in files])
    result: list[str] = pb.breaking_changes(before, after)
    return result


@pytest.mark.parametrize("kind", sorted(BREAKS))
def test_each_breaking_edit_is_reported_by_name(kind: str) -> None:
    edit, expected = BREAKS[kind]
    problems = changes_after(edit)
    assert len(problems) == 1 and expected in problems[0], problems


def test_a_removed_field_whose_number_is_reserved_passes_and_additions_pass() -> None:
    def remove_and_reserve(f: descriptor_pb2.FileDescriptorProto) -> None:
        hello = message(f, "Hello")
        remove_field(hello, 2)
        hello.reserved_range.add(start=2, end=3)
        hello.reserved_name.append("agent_version")

    def add_things(f: descriptor_pb2.FileDescriptorProto) -> None:
        message(f, "Hello").field.add(name="features", number=9, type=FDP.TYPE_STRING)
        enum(f, "Role").value.add(name="ROLE_NEW", number=99)
        f.message_type.add(name="Brand")
        (svc,) = f.service
        svc.method.add(
            name="Ping", input_type=".sitepair.v1.Hello", output_type=".sitepair.v1.Hello"
        )

    assert changes_after(remove_and_reserve) == []
    assert changes_after(add_things) == []


def test_the_script_checks_and_writes_the_baseline(tmp_path: Path) -> None:
    assert pb.main(["--check"]) == 0
    doc = pb.describe(pb.current_files())
    out = tmp_path / "b.json"
    out.write_text(pb.render(doc))
    assert json.loads(out.read_text()) == doc  # the committed rendering is plain JSON
