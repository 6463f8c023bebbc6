"""``sitepair-vdisk`` end to end: every command, and every error as one line with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sitepair.vdisk import open_disk
from sitepair.vdisk.cli import describe_size, main, parse_size
from tests.vdisk.helpers import MiB, qemu_compare_raw, require_qemu


def cli(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_parse_size() -> None:
    assert parse_size("4096") == 4096
    assert parse_size("64M") == 64 * MiB
    assert parse_size("1G") == 1 << 30
    assert parse_size("2TiB") == 2 << 40
    assert parse_size("0x1000") == 4096
    assert parse_size("4k") == 4096
    assert describe_size(64 * MiB) == "64 MiB"
    assert describe_size(1000) == "1000 bytes"


def test_create_write_read_info_compare_convert(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    img = tmp_path / "disk.vhd"
    code, out, _ = cli(capsys, "create", img, "--size", "16M")
    assert code == 0 and "vhd dynamic" in out
    assert cli(capsys, "write", img, "1M", "--pattern", "0xab", "--length", "5000")[0] == 0
    payload = tmp_path / "payload.bin"
    payload.write_bytes(b"hello world" * 100)
    assert cli(capsys, "write", img, "0x300001", "--from", payload)[0] == 0
    assert cli(capsys, "write", img, "1M", "--zero", "--length", "100")[0] == 0

    out_file = tmp_path / "out.bin"
    assert cli(capsys, "read", img, str(MiB), "5000", "--out", out_file)[0] == 0
    assert out_file.read_bytes() == bytes(100) + b"\xab" * 4900

    code, out, _ = cli(capsys, "info", img, "--json")
    info = json.loads(out)
    assert code == 0
    assert info["format"] == "vhd" and info["subformat"] == "dynamic"
    assert info["virtual_size"] == 16 * MiB
    assert info["details"]["creator_application"] == "win "
    code, out, _ = cli(capsys, "info", img)
    assert "virtual size" in out and "16 MiB" in out

    raw = tmp_path / "disk.raw"
    assert cli(capsys, "convert", img, raw)[0] == 0
    code, out, _ = cli(capsys, "compare", img, raw)
    assert (code, out.strip()) == (0, "Images are identical.")
    assert cli(capsys, "write", raw, "9M", "--pattern", "1", "--length", "1")[0] == 0
    code, out, _ = cli(capsys, "compare", img, raw)
    assert (code, out.strip()) == (1, f"Content mismatch at offset {9 * MiB}!")

    expected = bytearray(16 * MiB)
    expected[MiB + 100 : MiB + 5000] = b"\xab" * 4900
    expected[0x300001 : 0x300001 + 1100] = b"hello world" * 100
    require_qemu()
    qemu_compare_raw(img, bytes(expected), tmp_path)


def test_read_to_stdout(tmp_path: Path) -> None:
    img = tmp_path / "d.raw"
    img.write_bytes(bytes(range(256)) * 16)
    r = subprocess.run(
        [sys.executable, "-m", "sitepair.vdisk.cli", "read", str(img), "10", "6"],
        capture_output=True,
        check=False,
    )
    assert r.returncode == 0
    assert r.stdout == bytes(range(10, 16))


def test_differencing_and_merge(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base, child, grandchild = tmp_path / "b.vhd", tmp_path / "c.avhd", tmp_path / "g.avhd"
    assert cli(capsys, "create", base, "--size", "8M", "--subformat", "fixed")[0] == 0
    assert cli(capsys, "create", child, "--parent", base, "-O", "vhd")[0] == 0
    assert cli(capsys, "write", child, "100", "--pattern", "7", "--length", "1000")[0] == 0
    assert cli(capsys, "create", grandchild, "--parent", child, "-O", "vhd")[0] == 0
    code, out, _ = cli(capsys, "info", grandchild)
    assert code == 0 and out.count("parent:") == 2
    code, out, _ = cli(capsys, "merge", child, "--relink", grandchild)
    assert code == 0 and "relinked 1" in out
    assert not child.exists()
    with open_disk(grandchild, read_only=True) as disk:
        assert disk.read(100, 1000) == b"\x07" * 1000
        assert disk.parent is not None and disk.parent.path.name == "b.vhd"


def test_vhdx_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    img = tmp_path / "d.vhdx"
    args = ("create", img, "--size", "64M", "--block-size", "1M", "--logical-sector-size", "4096")
    assert cli(capsys, *args)[0] == 0
    assert cli(capsys, "write", img, "4096", "--pattern", "0x11", "--length", "8192")[0] == 0
    vhd = tmp_path / "d.vhd"
    assert cli(capsys, "convert", img, vhd)[0] == 0
    assert cli(capsys, "compare", img, vhd)[0] == 0
    code, out, _ = cli(capsys, "info", img, "--json")
    assert code == 0
    assert json.loads(out)["logical_sector_size"] == 4096


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("info", "{tmp}/missing.vhd"), "missing.vhd: no such file"),
        (("info", "{tmp}/garbage.vhd"), "garbage.vhd: not a VHD image"),
        (("info", "{tmp}/garbage.bin"), "unrecognised image format"),
        (("create", "{tmp}/x.vhd", "--size", "12Q"), "'12Q' is not a size"),
        (("create", "{tmp}/x.vhd"), "--size is needed"),
        (("create", "{tmp}/x.qcow2", "--size", "1M"), "cannot tell the image format"),
        (("create", "{tmp}/good.vhd", "--size", "1M"), "already exists"),
        (("create", "{tmp}/x.vhd", "--size", "1000"), "positive multiple of 512"),
        (("read", "{tmp}/good.vhd", "1M", "1"), "outside the disk"),
        (("write", "{tmp}/good.vhd", "0", "--pattern", "300", "--length", "1"), "byte value"),
        (("write", "{tmp}/good.vhd", "0", "--pattern", "1"), "--length is needed"),
        (("write", "{tmp}/good.vhd", "1048000", "--pattern", "1", "--length", "1000"), "outside"),
        (("compare", "{tmp}/good.vhd", "{tmp}/missing.raw"), "missing.raw: no such file"),
        (("merge", "{tmp}/good.vhd"), "not a differencing disk"),
        (("frobnicate",), "invalid choice"),
        ((), "the following arguments are required"),
    ],
)
def test_errors_are_one_line_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: tuple[str, ...], message: str
) -> None:
    (tmp_path / "garbage.vhd").write_bytes(b"x" * 4096)
    (tmp_path / "garbage.bin").write_bytes(b"x" * 4096)
    assert main(["create", str(tmp_path / "good.vhd"), "--size", "1M"]) == 0
    capsys.readouterr()
    code, out, err = cli(capsys, *(a.format(tmp=tmp_path) for a in args))
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sitepair-vdisk: error: ")
    assert message in lines[0]


def test_console_script_error_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.vhd"
    bad.write_bytes(b"conectix" + bytes(600))
    r = subprocess.run(
        [sys.executable, "-m", "sitepair.vdisk.cli", "info", str(bad)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("sitepair-vdisk: error: ")
    assert r.stderr.count("\n") == 1
