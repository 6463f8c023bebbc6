"""Offline initial replication: export a consistent cut to a folder, carry it, import it.

For VMs whose disks are too big for the link, the primary writes the first cut of every disk as
standalone images into an export folder (a removable drive, a share), with a manifest. The
folder travels to the recovery site, where the replica imports it as its sequence 1; delta
cycles then continue over the network from there. Each image's BLAKE3 digests go in the
manifest, and the import checks them, so a damaged copy is refused rather than replicated on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from agent.hosts.base import Cut
from agent.replication.replica import DiskState, ReplicaStore
from agent.replication.tracking import digests_of
from sitepair import vdisk
from sitepair.errors import FailedPrecondition, InvalidArgument, SitepairError
from sitepair.fsutil import atomic_write, fsync_dir
from sitepair.vdisk import ops as vdisk_ops

MANIFEST = "sitepair-export.json"
FORMAT = "sitepair-export/1"


def export_cut(
    cut: Cut, folder: Path, *, relationship: str, vm_id: str, epoch: int
) -> dict[str, Any]:
    """Write every disk of ``cut`` into ``folder`` as a standalone dynamic image."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / MANIFEST).exists():
        raise FailedPrecondition(f"{folder} already holds an export", hint="use an empty folder")
    disks = []
    for fd in cut.disks:
        target = folder / f"{fd.disk_id}.{fd.format}"
        vdisk_ops.flatten(Path(fd.chain[-1]), target)
        with vdisk.open_disk(target, read_only=True) as d:
            disks.append(
                {
                    "disk_id": fd.disk_id,
                    "file": target.name,
                    "format": fd.format,
                    "virtual_size": d.virtual_size,
                    "logical_sector_size": d.logical_sector_size,
                    "physical_sector_size": d.physical_sector_size,
                }
            )
        disks[-1]["digest"] = _digest_of_digests(digests_of(target))
    manifest = {
        "format": FORMAT,
        "relationship": relationship,
        "vm_id": vm_id,
        "epoch": epoch,
        "sequence": 1,
        "cut_id": cut.cut_id,
        "cut_at": cut.taken_at,
        "disks": disks,
    }
    atomic_write(folder / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def _digest_of_digests(digests: list[bytes]) -> str:
    import blake3

    return blake3.blake3(b"".join(digests)).hexdigest()


def read_manifest(folder: Path) -> dict[str, Any]:
    try:
        doc = json.loads((folder / MANIFEST).read_bytes())
    except FileNotFoundError as exc:
        raise InvalidArgument(f"{folder} holds no sitepair export ({MANIFEST} is missing)") from exc
    except ValueError as exc:
        raise InvalidArgument(f"{folder / MANIFEST} is damaged: {exc}") from exc
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise InvalidArgument(f"{folder / MANIFEST} is not a sitepair export")
    return doc


def import_export(store: ReplicaStore, folder: Path) -> int:
    """Make an export the replica's sequence 1. Returns the sequence imported."""
    manifest = read_manifest(folder)
    st = store.state
    if manifest["relationship"] != st.relationship:
        raise FailedPrecondition(
            f"the export in {folder} is for relationship {manifest['relationship']}, "
            f"not {st.relationship}"
        )
    if st.committed_sequence != 0 or st.disks:
        raise FailedPrecondition(
            f"the replica of {st.relationship} already holds data; nothing to import"
        )
    with store.lock:
        chains: dict[str, DiskState] = {}
        for d in manifest["disks"]:
            src = folder / d["file"]
            if _digest_of_digests(digests_of(src)) != d["digest"]:
                raise SitepairError(
                    f"{src} does not match the digest in the export manifest (damaged in transit?)",
                    hint="export again, or copy the folder again",
                )
            target_dir = store.root / "disks" / d["disk_id"]
            target_dir.mkdir(parents=True, exist_ok=True)
            partial = target_dir / f"import.{d['format']}.partial"
            shutil.copyfile(src, partial)
            final = target_dir / f"base.{d['format']}"
            partial.replace(final)
            fsync_dir(target_dir)
            chains[d["disk_id"]] = DiskState(
                virtual_size=int(d["virtual_size"]),
                format=d["format"],
                logical_sector_size=int(d.get("logical_sector_size", 512)),
                physical_sector_size=int(d.get("physical_sector_size", 4096)),
                chain=[f"disks/{d['disk_id']}/base.{d['format']}"],
            )
        st.disks = chains
        st.committed_sequence = int(manifest["sequence"])
        st.cut_at = float(manifest["cut_at"])
        st.epoch = max(st.epoch, int(manifest.get("epoch", 0)))
        st.committed_at = store.now()
        store.save()
    return st.committed_sequence
