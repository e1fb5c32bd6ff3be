"""The manifest of a checkpoint directory: which image files make up the checkpoint, their sizes
and sha256, and the (epoch, seq) of the process's files it belongs to (RELIABILITY.md, "Checkpoints").

Protocol: CRIU writes the images; `write_manifest` fsyncs every image, then writes the manifest to
a temporary name, fsyncs it, renames it into place and fsyncs the directory. A checkpoint is
committed exactly when its manifest exists. `verify_manifest` is the only way to accept a
checkpoint for restore: the manifest must parse, carry a correct checksum of itself, and every
file it lists must exist with its size and sha256, and no other file may be in the directory
(apart from CRIU's logs and sockets, which are not part of the checkpoint). CRIU checks only
image magics, so this is what catches a truncated or bit-flipped image.

All functions block (they read and hash every image); call them from a worker thread on trio.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from gfvm.errors import GfvmError

MANIFEST_NAME = "gfvm-manifest.json"
FORMAT = "gfvm-checkpoint/1"
#: files in a checkpoint directory that are not part of the checkpoint
NOT_IMAGES = ("*.log", "*.pid", "*.socket", "stats-restore", f"{MANIFEST_NAME}.tmp")


class ManifestError(GfvmError):
    """A checkpoint directory has no valid manifest, or its files do not match it: do not restore."""

    kind = "bad-checkpoint"


@dataclass(frozen=True)
class Manifest:
    """A verified (or freshly written) checkpoint manifest."""

    epoch: int
    seq: int
    files: dict[str, tuple[int, str]]  # name -> (size, sha256 hex)
    extra: dict = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(size for size, _ in self.files.values())


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _image_names(directory: Path, exclude: tuple[str, ...]) -> list[str]:
    names = []
    for entry in os.scandir(directory):
        if entry.name == MANIFEST_NAME or any(fnmatch.fnmatch(entry.name, p) for p in exclude):
            continue
        if not entry.is_file(follow_symlinks=False):
            raise ManifestError(f"{directory}: {entry.name} is not a regular file")
        names.append(entry.name)
    return sorted(names)


def _body_digest(body: dict) -> str:
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


def _fsync_path(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(
    directory: str | os.PathLike,
    *,
    epoch: int,
    seq: int,
    extra: dict | None = None,
    exclude: tuple[str, ...] = NOT_IMAGES,
) -> Manifest:
    """Commits the checkpoint in `directory` (blocking): fsyncs every image, then atomically
    writes the manifest (temporary file, fsync, rename, fsync of the directory).

    `epoch` and `seq` are the owner's fencing token for the process's files; `extra` is any
    JSON-able metadata the caller wants recorded (e.g. the gfvm id, source node).
    """
    directory = Path(directory)
    for name, value in (("epoch", epoch), ("seq", seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ManifestError(f"manifest {name} must be a non-negative integer, not {value!r}")
    files = {}
    for name in _image_names(directory, exclude):
        path = directory / name
        _fsync_path(path)
        files[name] = _hash_file(path)
    if not files:
        raise ManifestError(f"{directory}: no image files to commit")
    body = {
        "format": FORMAT,
        "epoch": epoch,
        "seq": seq,
        "files": {name: {"size": size, "sha256": digest} for name, (size, digest) in files.items()},
        "extra": extra or {},
    }
    text = json.dumps({**body, "self_sha256": _body_digest(body)}, indent=1, sort_keys=True)
    tmp = directory / f"{MANIFEST_NAME}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, directory / MANIFEST_NAME)
    _fsync_path(directory, os.O_RDONLY | os.O_DIRECTORY)
    return Manifest(epoch, seq, files, dict(extra or {}))


def read_manifest(directory: str | os.PathLike) -> Manifest:
    """Parses the manifest of `directory` and checks its own checksum, without checking the
    image files (blocking). Raises ManifestError."""
    directory = Path(directory)
    path = directory / MANIFEST_NAME
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ManifestError(f"{directory}: no {MANIFEST_NAME}: the checkpoint was never committed") from None
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict):
        raise ManifestError(f"{path}: not a JSON object")
    claimed = doc.pop("self_sha256", None)
    if doc.get("format") != FORMAT:
        raise ManifestError(f"{path}: unknown format {doc.get('format')!r} (expected {FORMAT})")
    if claimed != _body_digest(doc):
        raise ManifestError(f"{path}: its checksum does not match its content (corrupted)")
    try:
        epoch, seq, raw_files, extra = doc["epoch"], doc["seq"], doc["files"], doc["extra"]
        files = {}
        for name, meta in raw_files.items():
            size, digest = meta["size"], meta["sha256"]
            if (
                not isinstance(size, int)
                or size < 0
                or not isinstance(digest, str)
                or len(digest) != 64
                or "/" in name
                or name in ("", ".", "..")
            ):
                raise ValueError(name)
            files[name] = (size, digest)
    except (KeyError, TypeError, AttributeError, ValueError):
        raise ManifestError(f"{path}: malformed entries") from None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (epoch, seq)):
        raise ManifestError(f"{path}: epoch/seq must be non-negative integers")
    return Manifest(epoch, seq, files, extra if isinstance(extra, dict) else {})


def verify_manifest(
    directory: str | os.PathLike,
    *,
    epoch: int | None = None,
    seq: int | None = None,
    exclude: tuple[str, ...] = NOT_IMAGES,
) -> Manifest:
    """Returns the manifest of `directory` if the checkpoint verifies, else raises ManifestError
    saying what is wrong (blocking: hashes every image).

    With `epoch`/`seq` given, the manifest must also carry exactly those values (a checkpoint of
    another epoch is not the one the caller was handed).
    """
    directory = Path(directory)
    manifest = read_manifest(directory)
    if epoch is not None and manifest.epoch != epoch:
        raise ManifestError(f"{directory}: checkpoint is of epoch {manifest.epoch}, expected {epoch}")
    if seq is not None and manifest.seq != seq:
        raise ManifestError(f"{directory}: checkpoint is at seq {manifest.seq}, expected {seq}")
    present = _image_names(directory, exclude)
    unlisted = sorted(set(present) - set(manifest.files))
    if unlisted:
        raise ManifestError(f"{directory}: files not in the manifest: {', '.join(unlisted)}")
    for name, (size, digest) in manifest.files.items():
        path = directory / name
        try:
            got_size, got_digest = _hash_file(path)
        except FileNotFoundError:
            raise ManifestError(f"{directory}: {name} is listed in the manifest but missing") from None
        if got_size != size:
            raise ManifestError(f"{directory}: {name} has {got_size} bytes, the manifest says {size}")
        if got_digest != digest:
            raise ManifestError(f"{directory}: {name} does not match its sha256 (corrupted)")
    return manifest
