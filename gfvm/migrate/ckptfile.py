"""A committed checkpoint as one file: `/gfvm/procs/<id>/ckpt`, next to the paging file.

CRIU writes a directory of ~40 small images. The migration dumps them into a local staging
directory, adds the manifest (gfvm/migrate/manifest.py: sha256 per image, epoch, seq) and stores
the whole set as one file in /gfvm. One file instead of a directory of images because:
  - creating a file in /gfvm is a metadata operation committed by a majority; one per migration
    instead of ~40 keeps them out of the freeze;
  - the File Manager places a new file with its siblings (a process's files stay together), so
    the checkpoint has the same replica set as the paging file: the target, chosen among the
    paging file's replicas, holds it locally too.

Format (little-endian):
    magic "GFVMCKP1" | u32 count | count x (u16 name length, name, u64 size, bytes) | sha256 of
    everything before it (32 bytes)
The manifest is the last member. `unpack` checks the trailer before writing anything, and the
caller then accepts the directory only through `verify_manifest` (every image against the
manifest): a torn or damaged checkpoint is never restored. Everything here blocks.
"""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from gfvm.migrate.manifest import MANIFEST_NAME, NOT_IMAGES, ManifestError

MAGIC = b"GFVMCKP1"
MAX_MEMBERS = 10000
MAX_SIZE = 1 << 32


def pack(directory: str | os.PathLike) -> bytes:
    """The archive of a committed staging directory: its images, then its manifest."""
    directory = Path(directory)
    import fnmatch

    names = sorted(
        e.name
        for e in os.scandir(directory)
        if e.is_file(follow_symlinks=False)
        and e.name != MANIFEST_NAME
        and not any(fnmatch.fnmatch(e.name, p) for p in NOT_IMAGES)
    )
    if not (directory / MANIFEST_NAME).exists():
        raise ManifestError(f"{directory}: no manifest: commit the checkpoint before packing it")
    names.append(MANIFEST_NAME)
    parts = [MAGIC, struct.pack("<I", len(names))]
    for name in names:
        data = (directory / name).read_bytes()
        raw = name.encode()
        parts += [struct.pack("<H", len(raw)), raw, struct.pack("<Q", len(data)), data]
    body = b"".join(parts)
    return body + hashlib.sha256(body).digest()


def unpack(blob: bytes, directory: str | os.PathLike) -> list[str]:
    """Writes the members of an archive into the empty directory `directory`; returns their
    names. Raises ManifestError for anything malformed (nothing is written then)."""
    directory = Path(directory)
    if len(blob) < len(MAGIC) + 4 + 32 or not blob.startswith(MAGIC):
        raise ManifestError("the checkpoint file is not a gfvm checkpoint (bad magic or too short)")
    body, trailer = blob[:-32], blob[-32:]
    if hashlib.sha256(body).digest() != trailer:
        raise ManifestError("the checkpoint file is damaged or incomplete (checksum mismatch)")
    view = memoryview(body)
    pos = len(MAGIC)
    (count,) = struct.unpack_from("<I", view, pos)
    pos += 4
    if count > MAX_MEMBERS:
        raise ManifestError(f"the checkpoint file lists {count} members")
    members: list[tuple[str, memoryview]] = []
    try:
        for _ in range(count):
            (nlen,) = struct.unpack_from("<H", view, pos)
            pos += 2
            name = bytes(view[pos : pos + nlen]).decode()
            pos += nlen
            (size,) = struct.unpack_from("<Q", view, pos)
            pos += 8
            if size > MAX_SIZE or pos + size > len(view):
                raise ValueError("member runs past the end")
            if not name or "/" in name or name in (".", "..") or "\0" in name:
                raise ValueError(f"bad member name {name!r}")
            members.append((name, view[pos : pos + size]))
            pos += size
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"the checkpoint file is malformed: {exc}") from None
    if pos != len(view):
        raise ManifestError("the checkpoint file has trailing bytes")
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise ManifestError(f"{directory} is not empty: unpack into an empty directory")
    for name, data in members:
        with open(directory / name, "wb") as f:
            f.write(data)
    return [name for name, _ in members]
