"""The paging file of one managed process: `pages` (4 KiB slots), `index` (a log) and `meta.json`.

Format (docs/paging-file.md has the full description):
  pages     slot k = bytes [k*4096, (k+1)*4096); nothing else.
  index     a 64-byte header, then 32-byte records, each with its own CRC-32:
              PUT(asid, vpage, slot, crc)    page `vpage` of address space `asid` is in `slot`,
                                             whose 4096 bytes have CRC-32 `crc`
              PUTS(asid, n) + payload        n PUTs at once: the header record is followed by
                                             n vpages (u64), n slots (u64), n CRCs (u32), padded
                                             to 32 bytes; the header's `c` is the payload's CRC
              DROP(asid, vpage, n)           pages [vpage, vpage+n) are no longer in the file
                                             (munmap / MADV_DONTNEED: the process sees zeros)
              MOVE(asid, from, to, n)        mremap: entries of [from, from+n) now belong at `to`
              CLONE(parent, child)           fork: the child's entries are a copy of the parent's
              FORGET(asid)                   exec or exit: the address space is gone
              RELEASED(asid, vpage, n)       the pager dropped these (indexed, clean) pages from the
                                             process's memory; they come back on fault
            Replaying the records in order gives the current index. Replay stops at the first record
            whose CRC does not match (a torn append); that tail is cut off before the next append.
  meta.json identity of the process (id, name, command, format version), replaced atomically.

An asid (address-space id) is the task's pid inside its own PID namespace, which CRIU keeps across
migrations, so a restored task finds its pages under the same key.

Crash-safety invariants (the only order in which this module writes):
  I1  a PUT record is appended only after the data of its slot is fsynced (`sync_pages`);
  I2  a slot that any live entry references (in memory, hence also any durable entry) is never
      written: new data always goes to a slot with no references that is not waiting to be freed;
  I3  a slot whose last reference is replaced or dropped waits in `_pending_free` until the record
      that replaced/dropped it is durable (`commit`), and only then can be reused;
  I4  compaction writes a complete new index (header + one PUT per live entry) with `replace`, which
      is atomic, so a crash leaves the old log or the new one.
Together: after any crash, every entry the durable index holds points at the bytes it names.

Thread safety: none. One owner (the managed process's worker thread) calls everything; readers on
other nodes open their own PagingFile. Every method that touches the backing blocks.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from gfvm.pager.backing import PAGE_SIZE, BackingFile, PagingBacking

FORMAT_VERSION = 1
INDEX_MAGIC = b"GFVMIDX\0"
HEADER = struct.Struct("<8sIIQ36sI")  # magic, version, page size, generation, gfvm id, crc
RECORD = struct.Struct("<BBHIQQII")  # type, flags, reserved, asid, a, b, c, crc
assert HEADER.size == 64 and RECORD.size == 32

PUT, DROP, MOVE, CLONE, FORGET, RELEASED, PUTS = 1, 2, 3, 4, 5, 6, 7
RECORD_NAMES = {
    PUT: "PUT",
    DROP: "DROP",
    MOVE: "MOVE",
    CLONE: "CLONE",
    FORGET: "FORGET",
    RELEASED: "RELEASED",
    PUTS: "PUTS",
}

#: compact when the log holds more than this many times the live entries (and at least MIN records)
COMPACT_RATIO = 4
COMPACT_MIN_RECORDS = 65536

PAGES, INDEX, META = "pages", "index", "meta.json"


class PagingFileError(Exception):
    """The paging file is unusable (bad magic, wrong page size, checksum mismatch on a read)."""


def page_crc(page: bytes | memoryview) -> int:
    """CRC-32 (zlib's, IEEE polynomial) of one page: the checksum the index stores."""
    return zlib.crc32(page) & 0xFFFFFFFF


def _pack_record(rtype: int, asid: int, a: int = 0, b: int = 0, c: int = 0) -> bytes:
    body = RECORD.pack(rtype, 0, 0, asid, a, b, c, 0)[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


def _pack_puts(
    asid: int, vpages: Sequence[int], slots: Sequence[int], crcs: Sequence[int]
) -> bytes:
    """A PUTS record: header + struct-of-arrays payload (no per-page packing work)."""
    payload = (
        array("Q", vpages).tobytes() + array("Q", slots).tobytes() + array("I", crcs).tobytes()
    )
    payload += bytes(-len(payload) % RECORD.size)
    return _pack_record(PUTS, asid, len(vpages), 0, zlib.crc32(payload) & 0xFFFFFFFF) + payload


def _puts_payload_size(n: int) -> int:
    raw = 20 * n
    return raw + (-raw % RECORD.size)


def _pack_header(gfvm_id: str, generation: int) -> bytes:
    body = HEADER.pack(
        INDEX_MAGIC, FORMAT_VERSION, PAGE_SIZE, generation, gfvm_id.encode()[:36], 0
    )[:-4]
    return body + struct.pack("<I", zlib.crc32(body) & 0xFFFFFFFF)


@dataclass(frozen=True)
class Record:
    """One decoded index record (for replay, tests and `dump`). PUTS carries its arrays."""

    rtype: int
    asid: int
    a: int = 0
    b: int = 0
    c: int = 0
    payload: tuple | None = None

    def __str__(self) -> str:
        name = RECORD_NAMES.get(self.rtype, self.rtype)
        return f"{name}(asid={self.asid}, {self.a}, {self.b}, {self.c})"


def parse_index(data: bytes) -> tuple[str, int, list[Record], int]:
    """Decodes an index file: (gfvm id, generation, valid records, byte length of the valid prefix).

    Raises PagingFileError for a bad header; stops quietly at the first torn/corrupt record.
    """
    if len(data) < HEADER.size:
        raise PagingFileError("index file is shorter than its header")
    magic, version, page_size, generation, raw_id, crc = HEADER.unpack_from(data)
    if magic != INDEX_MAGIC:
        raise PagingFileError("not a gfvm paging index (bad magic)")
    if zlib.crc32(data[: HEADER.size - 4]) & 0xFFFFFFFF != crc:
        raise PagingFileError("paging index header checksum mismatch")
    if version != FORMAT_VERSION:
        raise PagingFileError(
            f"paging index format {version} is not supported (this gfvm reads {FORMAT_VERSION})"
        )
    if page_size != PAGE_SIZE:
        raise PagingFileError(f"paging index page size {page_size} != {PAGE_SIZE}")
    records = []
    off = HEADER.size
    view = memoryview(data)
    while off + RECORD.size <= len(data):
        rtype, _flags, _res, asid, a, b, c, crc = RECORD.unpack_from(data, off)
        if (
            zlib.crc32(view[off : off + RECORD.size - 4]) & 0xFFFFFFFF != crc
            or rtype not in RECORD_NAMES
        ):
            break
        if rtype == PUTS:
            size = _puts_payload_size(a)
            body = view[off + RECORD.size : off + RECORD.size + size]
            if len(body) != size or zlib.crc32(body) & 0xFFFFFFFF != c:
                break  # torn payload
            vp, sl, cr = array("Q"), array("Q"), array("I")
            vp.frombytes(body[: 8 * a])
            sl.frombytes(body[8 * a : 16 * a])
            cr.frombytes(body[16 * a : 20 * a])
            records.append(Record(rtype, asid, a, payload=(vp, sl, cr)))
            off += RECORD.size + size
            continue
        records.append(Record(rtype, asid, a, b, c))
        off += RECORD.size
    return raw_id.rstrip(b"\0").decode(errors="replace"), generation, records, off


class PageIndex:
    """The in-memory index: asid -> {vpage: slot << 32 | crc}, plus slot reference counts.

    Pure data structure (no I/O); `PagingFile` logs every change it makes here.
    """

    def __init__(self) -> None:
        self.spaces: dict[int, dict[int, int]] = {}
        self.refs = array("I")  # refs[slot] = number of entries (over all asids) pointing at slot
        self.released: dict[int, set[int]] = {}  # asid -> vpages the pager dropped from memory

    # --- queries ---
    def lookup(self, asid: int, vpage: int) -> tuple[int, int] | None:
        """(slot, crc) of a page, or None when the file has no data for it."""
        v = self.spaces.get(asid, {}).get(vpage)
        return None if v is None else (v >> 32, v & 0xFFFFFFFF)

    def entries(self, asid: int) -> dict[int, int]:
        """The live {vpage: slot << 32 | crc} of one address space (do not modify)."""
        return self.spaces.get(asid, {})

    def live_entries(self) -> int:
        return sum(len(s) for s in self.spaces.values())

    def slot_refs(self, slot: int) -> int:
        return self.refs[slot] if slot < len(self.refs) else 0

    # --- changes; each returns the slots whose last reference went away ---
    def _ref(self, slot: int) -> None:
        if slot >= len(self.refs):
            self.refs.extend([0] * (slot + 1 - len(self.refs)))
        self.refs[slot] += 1

    def _unref(self, slot: int, freed: list[int]) -> None:
        self.refs[slot] -= 1
        if self.refs[slot] == 0:
            freed.append(slot)

    def put(self, asid: int, vpage: int, slot: int, crc: int) -> list[int]:
        freed: list[int] = []
        space = self.spaces.setdefault(asid, {})
        old = space.get(vpage)
        self._ref(slot)
        space[vpage] = slot << 32 | crc
        if old is not None:
            self._unref(old >> 32, freed)
        rel = self.released.get(asid)
        if rel:
            rel.discard(vpage)
        return freed

    def put_many(
        self, asid: int, vpages: Sequence[int], slots: Sequence[int], crcs: Sequence[int]
    ) -> list[int]:
        """put() of many pages (the same result, fewer Python calls)."""
        freed: list[int] = []
        if not vpages:
            return freed
        space = self.spaces.setdefault(asid, {})
        refs = self.refs
        top = max(slots)
        if top >= len(refs):
            refs.extend([0] * (top + 1 - len(refs)))
        for v, slot, crc in zip(vpages, slots, crcs, strict=False):
            old = space.get(v)
            refs[slot] += 1
            space[v] = slot << 32 | crc
            if old is not None:
                o = old >> 32
                refs[o] -= 1
                if refs[o] == 0:
                    freed.append(o)
        rel = self.released.get(asid)
        if rel:
            rel.difference_update(vpages)
        return freed

    def drop(self, asid: int, vpage: int, npages: int) -> list[int]:
        freed: list[int] = []
        space = self.spaces.get(asid)
        if space:
            for v in self._keys_in(space, vpage, npages):
                self._unref(space.pop(v) >> 32, freed)
        rel = self.released.get(asid)
        if rel:
            for v in self._keys_in(rel, vpage, npages):
                rel.discard(v)
        return freed

    def move(self, asid: int, src: int, dst: int, npages: int) -> list[int]:
        freed = self.drop(asid, dst, npages) if src != dst else []
        space = self.spaces.get(asid)
        if space:
            moved = {v: space.pop(v) for v in self._keys_in(space, src, npages)}
            for v, packed in moved.items():
                space[v - src + dst] = packed
        rel = self.released.get(asid)
        if rel:
            moved_rel = self._keys_in(rel, src, npages)
            for v in moved_rel:
                rel.discard(v)
            rel.update(v - src + dst for v in moved_rel)
        return freed

    def clone(self, parent: int, child: int) -> list[int]:
        freed = self.forget(child)
        space = dict(self.spaces.get(parent, {}))
        for packed in space.values():
            self._ref(packed >> 32)
        self.spaces[child] = space
        if self.released.get(parent):
            self.released[child] = set(self.released[parent])
        return freed

    def forget(self, asid: int) -> list[int]:
        freed: list[int] = []
        for packed in self.spaces.pop(asid, {}).values():
            self._unref(packed >> 32, freed)
        self.released.pop(asid, None)
        return freed

    def mark_released(self, asid: int, vpage: int, npages: int) -> None:
        space = self.spaces.get(asid, {})
        rel = self.released.setdefault(asid, set())
        rel.update(v for v in self._keys_in(space, vpage, npages))

    @staticmethod
    def _keys_in(keys, vpage: int, npages: int) -> list[int]:
        span = range(vpage, vpage + npages)
        if npages <= 4 * len(keys):  # the intersection runs in C: ~30 ns per page
            found = keys.keys() & span if isinstance(keys, dict) else keys.intersection(span)
            return list(found)
        return [v for v in keys if vpage <= v < vpage + npages]

    def apply(self, rec: Record) -> list[int]:
        """Applies one decoded record (replay)."""
        if rec.rtype == PUT:
            return self.put(rec.asid, rec.a, rec.b, rec.c)
        if rec.rtype == PUTS:
            assert rec.payload is not None
            return self.put_many(rec.asid, *rec.payload)
        if rec.rtype == DROP:
            return self.drop(rec.asid, rec.a, rec.b)
        if rec.rtype == MOVE:
            return self.move(rec.asid, rec.a, rec.b, rec.c)
        if rec.rtype == CLONE:
            return self.clone(rec.asid, rec.a)
        if rec.rtype == FORGET:
            return self.forget(rec.asid)
        if rec.rtype == RELEASED:
            self.mark_released(rec.asid, rec.a, rec.b)
            return []
        raise PagingFileError(f"unknown index record type {rec.rtype}")


@dataclass
class StagedPages:
    """Pages written to fresh slots but not yet indexed (see PagingFile.stage)."""

    asid: int
    vpages: list[int]
    slots: list[int]
    crcs: list[int]


class PagingFile:
    """One process's paging file, open for writing (or for reading on a migration target)."""

    def __init__(self, backing: PagingBacking, directory: str, gfvm_id: str) -> None:
        self.backing = backing
        self.directory = directory
        self.gfvm_id = gfvm_id
        self.index = PageIndex()
        self.generation = 0
        self._pages: BackingFile | None = None
        self._log: BackingFile | None = None
        self._log_end = 0  # byte offset where the next record goes
        self._log_records = 0
        self._buffer: list[bytes] = []  # records appended since the last commit
        self._buffered_entries = 0  # entries (pages of PUTS, other records) in _buffer
        self._nslots = 0  # slots that exist in the pages file (0 .. _nslots-1)
        self._free: list[int] = []  # reusable slots (no references, not pending)
        self._free_sorted = True  # _free is sorted highest first
        self._free_set: set[int] = set()
        self._pending_free: list[int] = []  # unreferenced, reusable after the next commit (I3)
        self._staged: set[int] = set()  # slots handed out by stage(), not yet put or released
        #: while True nothing is written: commit() keeps its records buffered, page writes and
        #: compaction are refused (a migration target before its commit point: the files are
        #: still the source's to take back, see docs/migration.md)
        self.held = False

    # --- open / create ---------------------------------------------------------------------------

    def _rel(self, name: str) -> str:
        return f"{self.directory}/{name}"

    @classmethod
    def create(cls, backing: PagingBacking, directory: str, meta: dict) -> PagingFile:
        """Creates an empty paging file in `directory` (which must not hold one). Blocks."""
        gfvm_id = meta["id"]
        if backing.exists(f"{directory}/{INDEX}"):
            raise FileExistsError(f"a paging file already exists in {directory}")
        backing.makedirs(directory)
        pf = cls(backing, directory, gfvm_id)
        backing.replace(
            pf._rel(META),
            json.dumps(
                {**meta, "format": FORMAT_VERSION, "page_size": PAGE_SIZE}, indent=1
            ).encode(),
        )
        pf._pages = backing.open(pf._rel(PAGES), create=True)
        backing.replace(pf._rel(INDEX), _pack_header(gfvm_id, 0))
        pf._log = backing.open(pf._rel(INDEX))
        pf._log_end = HEADER.size
        return pf

    @classmethod
    def open(cls, backing: PagingBacking, directory: str) -> PagingFile:
        """Opens an existing paging file and replays its index (cutting off a torn tail). Blocks."""
        data = backing.read_file(f"{directory}/{INDEX}")
        gfvm_id, generation, records, valid_len = parse_index(data)
        pf = cls(backing, directory, gfvm_id)
        pf.generation = generation
        for rec in records:
            pf.index.apply(rec)
        pf._log_records = sum(r.a if r.rtype == PUTS else 1 for r in records)
        pf._pages = backing.open(pf._rel(PAGES))
        pf._log = backing.open(pf._rel(INDEX))
        if valid_len != len(data):
            pf._log.truncate(valid_len)
            pf._log.fsync()
        pf._log_end = valid_len
        pf._nslots = -(-pf._pages.size() // PAGE_SIZE)
        pf._free = [s for s in range(pf._nslots) if pf.index.slot_refs(s) == 0]
        pf._free_sorted = False
        pf._free_set = set(pf._free)
        return pf

    def refresh(self) -> list[Record] | None:
        """Brings a file opened on another node up to date with what its writer appended since
        (a migration target, between its early open and the restore; nothing may have been
        written through this object). Returns the records applied, or None when the writer
        compacted the index meanwhile (then open the file again). Blocks."""
        assert self._log is not None and self._pages is not None
        if self._buffer or self._staged:
            raise PagingFileError("refresh of a paging file this node has written to")
        head = self._log.pread(HEADER.size, 0)
        size = self._log.size()
        _id, generation, _r, _v = parse_index(head)
        if generation != self.generation or size < self._log_end:
            return None
        if size == self._log_end:
            return []
        tail = self._log.pread(size - self._log_end, self._log_end)
        _id, _g, records, valid = parse_index(head + tail)
        refs = self.index.refs
        freed: list[int] = []
        taken: set[int] = set()
        for rec in records:
            freed += self.index.apply(rec)
            if rec.rtype == PUT:
                taken.add(rec.b)
            elif rec.rtype == PUTS:
                taken.update(rec.payload[1])
        self._log_end += valid - HEADER.size
        self._log_records += sum(r.a if r.rtype == PUTS else 1 for r in records)
        old_nslots = self._nslots
        self._nslots = max(old_nslots, -(-self._pages.size() // PAGE_SIZE))
        refs = self.index.refs
        now_free = {s for s in freed if s >= len(refs) or refs[s] == 0}
        now_free.update(s for s in range(old_nslots, self._nslots)
                        if s >= len(refs) or refs[s] == 0)
        now_free -= {s for s in taken if s < len(refs) and refs[s] > 0}
        self._free_set -= taken
        self._free_set |= now_free
        self._free = list(self._free_set)
        self._free_sorted = False
        return records

    def reopen(self) -> str:
        """Opens `pages` and `index` again and makes sure they are still what this object wrote
        (a migration's rollback: while another node was the files' master, this node's File
        Manager may have replaced its copies, and a target may have written to them). An index
        that differs from ours (length or generation) is rewritten from this object's state
        (compaction: what we committed is the truth, anything appended since never committed).
        Returns "" or a description of what was repaired. Raises PagingFileError when `pages` is
        too short for the slots the index uses (its data is lost here). Blocks."""
        if self._buffer or self._staged:
            raise PagingFileError("reopen of a paging file with uncommitted writes")
        for f in (self._pages, self._log):
            if f is not None:
                f.close()
        self._pages = self.backing.open(self._rel(PAGES))
        self._log = self.backing.open(self._rel(INDEX))
        used = len(self.index.refs)
        while used and self.index.refs[used - 1] == 0:
            used -= 1
        nslots = -(-self._pages.size() // PAGE_SIZE)
        local = os.fstat(self._pages.local_read_fd()).st_size // PAGE_SIZE  # what faults read
        if min(nslots, local) < used:
            raise PagingFileError(
                f"{self._rel(PAGES)} holds {nslots} slots ({local} in this node's copy); the "
                f"index uses slots up to {used - 1}")
        appended = [s for s in range(self._nslots, nslots) if self.index.slot_refs(s) == 0]
        self._nslots = max(self._nslots, nslots)
        self._free.extend(appended)  # slots another writer added: nothing of ours is there
        self._free_set.update(appended)
        self._free_sorted = False
        size = self._log.size()
        head = self._log.pread(HEADER.size, 0)
        try:
            _id, generation, _r, _v = parse_index(head)
        except Exception:  # noqa: BLE001 - a damaged header is rewritten below like any change
            generation = -1
        if size == self._log_end and generation == self.generation:
            return ""
        what = (f"{self._rel(INDEX)} was changed while this node was not its master "
                f"({size} bytes at generation {generation}, we wrote {self._log_end} at "
                f"{self.generation}): rewritten from this node's index")
        self.generation = max(self.generation, generation)
        self.compact()
        return what

    def read_meta(self) -> dict:
        """meta.json as a dict. Blocks."""
        return json.loads(self.backing.read_file(self._rel(META)))

    def write_meta(self, meta: dict) -> None:
        """Replaces meta.json atomically. Blocks."""
        self.backing.replace(
            self._rel(META),
            json.dumps(
                {**meta, "id": self.gfvm_id, "format": FORMAT_VERSION, "page_size": PAGE_SIZE},
                indent=1,
            ).encode(),
        )

    def pages_read_fd(self) -> int:
        """Read-only fd of the local copy of `pages` (for the native fault loop; do not close)."""
        assert self._pages is not None
        return self._pages.local_read_fd()

    def close(self) -> None:
        """Closes the files (buffered records that were not committed are lost). Blocks."""
        for f in (self._pages, self._log):
            if f is not None:
                f.close()
        self._pages = self._log = None

    # --- reading -------------------------------------------------------------------------------

    def read_page(self, asid: int, vpage: int) -> bytes | None:
        """The page's bytes (checksum verified), or None if the file has none. Blocks."""
        found = self.index.lookup(asid, vpage)
        if found is None:
            return None
        slot, crc = found
        assert self._pages is not None
        data = self._pages.pread(PAGE_SIZE, slot * PAGE_SIZE)
        if len(data) != PAGE_SIZE or page_crc(data) != crc:
            raise PagingFileError(
                f"paging file {self.directory}: page {vpage:#x} of asid {asid} (slot {slot}) "
                "fails its checksum"
            )
        return data

    # --- writing: stage data, make it durable, then index it -----------------------------------

    def _alloc(self, n: int) -> list[int]:
        """n free slots, lowest first (runs of consecutive slots make large writes)."""
        if not self._free_sorted:
            self._free.sort(reverse=True)  # pop() from the end gives the lowest
            self._free_sorted = True
        take = min(n, len(self._free))
        slots = self._free[len(self._free) - take :][::-1]
        del self._free[len(self._free) - take :]
        self._free_set.difference_update(slots)
        if take < n:
            slots.extend(range(self._nslots, self._nslots + n - take))
            self._nslots += n - take
        self._staged.update(slots)
        return slots

    def stage(
        self, asid: int, vpages: Sequence[int], data: memoryview, crcs: Sequence[int] | None = None
    ) -> StagedPages:
        """Writes len(vpages) pages from `data` into fresh slots (not yet durable nor indexed).

        `crcs` may carry precomputed page checksums. Follow with `sync_pages()` and then `put()`
        (or `release_staged()` for pages that must not be indexed). Blocks.
        """
        staged, write = self.prepare(asid, vpages, data, crcs)
        write()
        return staged

    def prepare(
        self, asid: int, vpages: Sequence[int], data: memoryview, crcs: Sequence[int] | None = None
    ) -> tuple[StagedPages, Callable[[], None]]:
        """stage() in two halves: allocates slots and checksums now, returns the write as a
        callable that may run on another thread (it only writes the pages file; `data` must stay
        untouched until it has returned). Call sync_pages() after every write has returned."""
        if self.held:
            raise PagingFileError("the paging file is held (migration not committed): no page writes")
        n = len(vpages)
        if len(data) != n * PAGE_SIZE:
            raise ValueError("stage: data is not len(vpages) pages")
        if crcs is None:
            crc32 = zlib.crc32
            crcs = [crc32(data[i : i + PAGE_SIZE]) for i in range(0, n * PAGE_SIZE, PAGE_SIZE)]
        slots = self._alloc(n)
        pages = self._pages
        assert pages is not None
        offsets = [s * PAGE_SIZE for s in slots]
        return StagedPages(asid, list(vpages), slots, list(crcs)), lambda: pages.write_pages(
            offsets, data
        )

    def sync_pages(self) -> None:
        """fsync of the pages file: everything staged so far is durable (I1). Blocks."""
        assert self._pages is not None
        self._pages.fsync()

    def put(self, staged: StagedPages, accepted: Iterable[int] | None = None) -> None:
        """Indexes staged pages (all, or only positions in `accepted`); the others' slots are
        released. Call only after `sync_pages()`. In memory until `commit()`."""
        n = len(staged.vpages)
        keep = range(n) if accepted is None else sorted(set(accepted))
        self._staged.difference_update(staged.slots)
        if len(keep) == n:
            vpages, slots, crcs = staged.vpages, staged.slots, staged.crcs
        else:
            vpages = [staged.vpages[i] for i in keep]
            slots = [staged.slots[i] for i in keep]
            crcs = [staged.crcs[i] for i in keep]
            kept = set(slots)
            self._pending_free += [s for s in staged.slots if s not in kept]
        if vpages:
            self._append(_pack_puts(staged.asid, vpages, slots, crcs), len(vpages))
            self._pending_free += self.index.put_many(staged.asid, vpages, slots, crcs)

    def release_staged(self, staged: StagedPages) -> None:
        """Gives back the slots of staged pages that will not be indexed."""
        self.put(staged, accepted=())

    def drop(self, asid: int, vpage: int, npages: int) -> None:
        """Pages [vpage, vpage+npages) of asid are no longer in the file (munmap, DONTNEED)."""
        self._append(_pack_record(DROP, asid, vpage, npages))
        self._pending_free += self.index.drop(asid, vpage, npages)

    def move(self, asid: int, src: int, dst: int, npages: int) -> None:
        """mremap: the entries of [src, src+npages) now belong at dst."""
        self._append(_pack_record(MOVE, asid, src, dst, npages))
        self._pending_free += self.index.move(asid, src, dst, npages)

    def clone(self, parent: int, child: int) -> None:
        """fork: the child's entries become a copy of the parent's."""
        self._append(_pack_record(CLONE, parent, child))
        self._pending_free += self.index.clone(parent, child)

    def forget(self, asid: int) -> None:
        """exec or exit: drops every entry of the address space."""
        self._append(_pack_record(FORGET, asid))
        self._pending_free += self.index.forget(asid)

    def mark_released(self, asid: int, vpage: int, npages: int) -> None:
        """Records that the pager dropped these indexed pages from the process's memory."""
        self._append(_pack_record(RELEASED, asid, vpage, npages))
        self.index.mark_released(asid, vpage, npages)

    def _append(self, record: bytes, entries: int = 1) -> None:
        self._buffer.append(record)
        self._buffered_entries += entries

    @property
    def uncommitted(self) -> int:
        """Records buffered since the last commit."""
        return len(self._buffer)

    def commit(self) -> None:
        """Appends the buffered records, fsyncs the index, then frees superseded slots (I3).
        Compacts the log when it has grown COMPACT_RATIO times past the live entries. While
        `held`, does nothing (the records stay buffered until the hold ends). Blocks."""
        assert self._log is not None
        if self.held:
            return
        if self._buffer:
            blob = b"".join(self._buffer)
            self._log.pwrite(blob, self._log_end)
            self._log.fsync()
            self._log_end += len(blob)
            self._log_records += self._buffered_entries
            self._buffer = []
            self._buffered_entries = 0
        self._free_pending()
        live = self.index.live_entries()
        if self._log_records > max(COMPACT_MIN_RECORDS, COMPACT_RATIO * live):
            self.compact()

    def _free_pending(self) -> None:
        refs = self.index.refs
        nrefs = len(refs)
        # A slot may have been referenced again by a later put in the same batch (clone+put):
        # free it only if nothing points at it now.
        fresh = {s for s in self._pending_free if (s >= nrefs or refs[s] == 0)}
        fresh -= self._free_set
        fresh -= self._staged
        if fresh:
            self._free.extend(fresh)
            self._free_set |= fresh
            self._free_sorted = False
        self._pending_free = []

    def compact(self) -> None:
        """Rewrites the index as one PUT per live entry (atomic replace, I4). Blocks."""
        if self.held:
            raise PagingFileError("the paging file is held (migration not committed): no compaction")
        if self._buffer:
            self.commit()
        self.generation += 1
        parts = [_pack_header(self.gfvm_id, self.generation)]
        for asid, space in sorted(self.index.spaces.items()):
            items = sorted(space.items())
            for i in range(0, len(items), 65536):
                chunk = items[i : i + 65536]
                parts.append(
                    _pack_puts(
                        asid,
                        [v for v, _ in chunk],
                        [p >> 32 for _, p in chunk],
                        [p & 0xFFFFFFFF for _, p in chunk],
                    )
                )
            for start, n in _runs(sorted(self.index.released.get(asid, ()))):
                parts.append(_pack_record(RELEASED, asid, start, n))
        blob = b"".join(parts)
        assert self._log is not None
        self._log.close()
        self.backing.replace(self._rel(INDEX), blob)
        self._log = self.backing.open(self._rel(INDEX))
        self._log_end = len(blob)
        self._log_records = self.index.live_entries()

    # --- statistics ---
    def stats(self) -> dict:
        """Sizes and counts (no I/O)."""
        return {
            "slots": self._nslots,
            "free_slots": len(self._free),
            "pending_free": len(self._pending_free),
            "live_pages": self.index.live_entries(),
            "log_records": self._log_records,
            "generation": self.generation,
        }


def _runs(sorted_pages: list[int]) -> Iterator[tuple[int, int]]:
    """(start, length) of each run of consecutive numbers."""
    start = prev = None
    for v in sorted_pages:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            yield start, prev - start + 1
            start = prev = v
    if start is not None:
        yield start, prev - start + 1


def load_index(backing: PagingBacking, directory: str) -> PageIndex:
    """The index of the paging file in `directory`, read-only (a migration target's view).
    Blocks."""
    _gfvm_id, _gen, records, _len = parse_index(backing.read_file(f"{directory}/{INDEX}"))
    index = PageIndex()
    for rec in records:
        index.apply(rec)
    return index
