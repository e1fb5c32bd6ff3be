"""Checkpoint manifests (gfvm.migrate.manifest): a checkpoint is restored only when its manifest
verifies; every way of breaking it is refused with a clear error."""

from __future__ import annotations

import json

import pytest

from gfvm.migrate import criu
from gfvm.migrate.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_manifest, write_manifest


@pytest.fixture
def ckpt(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "inventory.img").write_bytes(b"inv" * 10)
    (d / "pages-1.img").write_bytes(bytes(range(256)) * 64)
    (d / "criu-dump.log").write_text("logs are not part of the checkpoint")
    return d


def test_write_then_verify(ckpt):
    written = write_manifest(ckpt, epoch=3, seq=17, extra={"id": "p1"})
    assert set(written.files) == {"inventory.img", "pages-1.img"}
    got = verify_manifest(ckpt, epoch=3, seq=17)
    assert (got.epoch, got.seq, got.extra, got.files) == (3, 17, {"id": "p1"}, written.files)
    assert got.total_bytes == 30 + 256 * 64
    assert not (ckpt / f"{MANIFEST_NAME}.tmp").exists()


def test_no_manifest_means_not_committed(ckpt):
    with pytest.raises(ManifestError, match="never committed"):
        verify_manifest(ckpt)


def test_flipped_byte_in_an_image_is_refused(ckpt):
    write_manifest(ckpt, epoch=1, seq=1)
    data = bytearray((ckpt / "pages-1.img").read_bytes())
    data[1000] ^= 0x40
    (ckpt / "pages-1.img").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match="pages-1.img does not match its sha256"):
        verify_manifest(ckpt)


def test_truncated_image_is_refused(ckpt):
    write_manifest(ckpt, epoch=1, seq=1)
    (ckpt / "pages-1.img").write_bytes(b"short")
    with pytest.raises(ManifestError, match="has 5 bytes"):
        verify_manifest(ckpt)


def test_missing_and_unlisted_files_are_refused(ckpt):
    write_manifest(ckpt, epoch=1, seq=1)
    (ckpt / "core-9.img").write_bytes(b"stray")
    with pytest.raises(ManifestError, match="not in the manifest: core-9.img"):
        verify_manifest(ckpt)
    (ckpt / "core-9.img").unlink()
    (ckpt / "inventory.img").unlink()
    with pytest.raises(ManifestError, match="inventory.img is listed in the manifest but missing"):
        verify_manifest(ckpt)


def test_edited_manifest_is_refused(ckpt):
    write_manifest(ckpt, epoch=1, seq=1)
    doc = json.loads((ckpt / MANIFEST_NAME).read_text())
    doc["epoch"] = 2  # e.g. a forged or half-written newer epoch
    (ckpt / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="checksum does not match"):
        read_manifest(ckpt)


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"format": "other"}', b"\xff\xfe"])
def test_garbage_manifest_is_refused(ckpt, data):
    (ckpt / MANIFEST_NAME).write_bytes(data)
    with pytest.raises(ManifestError):
        verify_manifest(ckpt)


def test_wrong_epoch_or_seq_is_refused(ckpt):
    write_manifest(ckpt, epoch=4, seq=9)
    with pytest.raises(ManifestError, match="epoch 4, expected 5"):
        verify_manifest(ckpt, epoch=5)
    with pytest.raises(ManifestError, match="seq 9, expected 10"):
        verify_manifest(ckpt, seq=10)


@pytest.mark.parametrize("epoch, seq", [(-1, 0), (0, -1), ("1", 0), (True, 0)])
def test_bad_epoch_or_seq_cannot_be_written(ckpt, epoch, seq):
    with pytest.raises(ManifestError):
        write_manifest(ckpt, epoch=epoch, seq=seq)
    assert not (ckpt / MANIFEST_NAME).exists()


def test_restore_refuses_a_checkpoint_that_does_not_verify(ckpt, root):
    write_manifest(ckpt, epoch=1, seq=1)
    (ckpt / "pages-1.img").write_bytes(b"tampered")
    with pytest.raises(ManifestError):
        criu.restore_blocking(ckpt, work_dir=ckpt.parent / "work")
    assert not (ckpt.parent / "work" / "criu-restore.log").exists()  # CRIU never ran
