"""The pager's PagingBacking over /gfvm (gfvm.fm.backing), called from worker threads as the
pager does, on File Managers in this trio loop; and the pager's own PagingFile on top of it."""

from __future__ import annotations

import os

import pytest
import trio

from gfvm.fm.backing import FmBacking
from test_fm_api import single, trio_cluster

PAGE = 4096


def backing_of(files) -> FmBacking:
    return FmBacking(files, trio.lowlevel.current_trio_token())


async def in_thread(fn):
    return await trio.to_thread.run_sync(fn)


async def test_backing_file_operations_from_a_thread(tmp_path):
    async with single(tmp_path) as files:
        b = backing_of(files)

        def work():
            b.makedirs("procs/3")
            assert b.exists("procs/3") and not b.exists("procs/3/pages")
            with pytest.raises(FileNotFoundError):
                b.open("procs/3/pages")
            f = b.open("procs/3/pages", create=True)
            data = os.urandom(3 * PAGE)
            f.write_pages([0, 8 * PAGE, 9 * PAGE], memoryview(bytearray(data)))
            f.pwrite(b"tail", 20 * PAGE)
            f.fsync()
            assert f.pread(PAGE, 8 * PAGE) == data[PAGE : 2 * PAGE]
            assert f.size() == 20 * PAGE + 4
            assert os.pread(f.local_read_fd(), PAGE, 9 * PAGE) == data[2 * PAGE :]
            f.truncate(10 * PAGE)
            assert f.size() == 10 * PAGE
            f.close()
            b.replace("procs/3/meta.json", b'{"a": 1}')
            b.replace("procs/3/meta.json", b'{"a": 2}')
            assert b.read_file("procs/3/meta.json") == b'{"a": 2}'
            assert sorted(n for n in os.listdir(files.fm.store.files_dir)) != []
            b.remove_tree("procs/3")
            assert not b.exists("procs/3")
            b.remove_tree("procs/3")  # absent: no error

        await in_thread(work)
        assert await files.listdir("/") == ["procs"]


async def test_pagers_paging_file_over_replicated_backing(tmp_path):
    from gfvm.pager.pagefile import PagingFile

    async with trio_cluster(tmp_path) as nodes:
        b1 = backing_of(nodes["n1"])

        def page(tag):
            return tag.to_bytes(8, "little") * (PAGE // 8)

        def write_side():
            pf = PagingFile.create(b1, "procs/a1", {"id": "a1"})
            vpages = [0x400, 0x401, 0x7F00]
            data = memoryview(b"".join(page(i + 1) for i in range(3)))
            staged = pf.stage(2, vpages, data)
            pf.sync_pages()
            pf.put(staged)
            pf.commit()
            pf.close()

        await in_thread(write_side)
        holders = await nodes["n1"].in_sync_nodes(["procs/a1/pages", "procs/a1/index"])
        target = next(n for n in holders if n != "n1")
        for rel in ("procs/a1/pages", "procs/a1/index", "procs/a1/meta.json"):
            await nodes["n1"].promote(rel, target)
        bt = backing_of(nodes[target])

        def read_side():
            pf = PagingFile.open(bt, "procs/a1")
            got = [pf.read_page(2, v) for v in (0x400, 0x401, 0x7F00)]
            pf.close()
            return got

        assert await in_thread(read_side) == [page(1), page(2), page(3)]
