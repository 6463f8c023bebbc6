"""sitepair.paths: names from other hosts never lead out of their root."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sitepair import paths
from sitepair.errors import InvalidArgument


@pytest.mark.parametrize("name", ["os", "data-1", "scsi0-1", "disk_2.vhdx", "_x", "A" * 128])
def test_plain_names_are_components(name: str) -> None:
    assert paths.check_component(name, "disk id") == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        ".hidden",
        "trailing.",
        "-flag",
        "a/b",
        "../../etc",
        "/abs",
        "a\\b",
        "C:",
        "nul\0byte",
        "sp ace",
        "CON",
        "nul.txt",
        "com1",
        "é",
        "A" * 129,
    ],
)
def test_dangerous_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        paths.check_component(name, "disk id")
    assert "disk id" in str(info.value)


def test_a_refusal_does_not_echo_a_huge_value() -> None:
    with pytest.raises(InvalidArgument) as info:
        paths.check_component("/" * 250_000, "disk id")
    assert len(str(info.value)) < 600


def test_inside_follows_symlinks(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    os.symlink(outside, root / "link")
    assert paths.inside(root, "ok", what="folder") == (root / "ok").resolve()
    with pytest.raises(InvalidArgument, match="outside"):
        paths.inside(root, "link", what="folder")
    with pytest.raises(InvalidArgument, match="outside"):
        paths.check_inside(root, root / "link" / "x", "folder")
    with pytest.raises(InvalidArgument, match="outside"):
        paths.check_inside(root, "../outside", "folder")
    with pytest.raises(InvalidArgument, match="outside"):
        paths.check_inside(root, str(outside), "folder")
    with pytest.raises(InvalidArgument, match="NUL"):
        paths.check_inside(root, "a\0b", "folder")
    with pytest.raises(InvalidArgument, match="backslash"):
        paths.check_inside(root, "..\\outside", "folder")
    assert paths.check_inside(root, root / "a" / ".." / "b", "folder") == (root / "b").resolve()


def test_display_names_are_bounded_and_printable() -> None:
    assert paths.check_display_name("Web server (prod) #1", "VM name") == "Web server (prod) #1"
    for bad in ("", "x" * 257, "a\nb", "a\0b", "a\u202eb"):
        with pytest.raises(InvalidArgument):
            paths.check_display_name(bad, "VM name")


@given(st.text(max_size=300))
def test_any_text_slugs_to_a_safe_component(text: str) -> None:
    s = paths.slug(text)
    assert paths.check_component(s, "slug") == s
    assert len(s) <= 48


@given(st.text(max_size=60))
def test_components_never_escape(text: str) -> None:
    root = Path("/srv/replicas")
    try:
        paths.check_component(text, "x")
    except InvalidArgument:
        return
    assert paths.is_inside(root, root / text)
    assert (root / text).parent == root
