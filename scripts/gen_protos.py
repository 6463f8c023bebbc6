"""Regenerate the committed protobuf/gRPC stubs under sitepair/v1 from proto/sitepair/v1.

Run with the pinned grpcio-tools and mypy-protobuf from requirements/constraints.txt so that
every machine produces the same bytes. ``--check`` regenerates into a temporary folder and fails
(exit 1, naming the files) when the committed stubs differ: CI runs it so nobody edits generated
code by hand or forgets to regenerate after changing a .proto file.
"""

from __future__ import annotations

import argparse
import filecmp
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
OUT_PACKAGE = Path("sitepair") / "v1"
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py", "_pb2_grpc.pyi")


def generate(out_root: Path) -> list[Path]:
    protos = sorted((PROTO_ROOT / "sitepair" / "v1").glob("*.proto"))
    if not protos:
        raise SystemExit("no .proto files under proto/sitepair/v1")
    well_known = Path(protoc.__file__).parent / "_proto"
    bindir = Path(sys.executable).parent
    args = [
        "grpc_tools.protoc",
        f"--plugin=protoc-gen-mypy={bindir / 'protoc-gen-mypy'}",
        f"--plugin=protoc-gen-mypy_grpc={bindir / 'protoc-gen-mypy_grpc'}",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--mypy_out={out_root}",
        f"--grpc_python_out={out_root}",
        f"--mypy_grpc_out={out_root}",
        *(str(p) for p in protos),
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise SystemExit(f"protoc failed with exit status {rc}")
    out_dir = out_root / OUT_PACKAGE
    (out_dir / "__init__.py").write_text(
        '"""Generated protobuf and gRPC stubs. Never edit by hand."""\n'
    )
    return sorted(p for p in out_dir.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if committed stubs are stale")
    args = parser.parse_args()
    target = ROOT / OUT_PACKAGE
    with tempfile.TemporaryDirectory() as tmp:
        tmp_root = Path(tmp)
        fresh = generate(tmp_root)
        fresh_names = {p.name for p in fresh} | {"__init__.py"}
        committed = {p.name for p in target.iterdir() if p.name.endswith(GENERATED_SUFFIXES)} | {
            "__init__.py"
        }
        if args.check:
            stale = sorted(
                n
                for n in fresh_names | committed
                if not (target / n).exists()
                or not (tmp_root / OUT_PACKAGE / n).exists()
                or not filecmp.cmp(target / n, tmp_root / OUT_PACKAGE / n, shallow=False)
            )
            if stale:
                print("generated stubs are stale; run `make proto` and commit:", *stale, sep="\n  ")
                return 1
            print(f"stubs up to date ({len(fresh)} files)")
            return 0
        for name in committed - fresh_names:
            (target / name).unlink()
        for name in fresh_names:
            shutil.copyfile(tmp_root / OUT_PACKAGE / name, target / name)
        print(f"wrote {len(fresh_names)} files to {OUT_PACKAGE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
