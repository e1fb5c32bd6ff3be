"""The File Manager: /gfvm on every node, every file replicated on several nodes' disks.

Read in this order: core.py (layers, namespace, routing), master.py (replication protocol),
consensus.py (replicated metadata, leases), store.py (local copies, crash discipline),
api.py (the same-node API the pager and migration use), fuse.py (the mount).

Same-node API in one glance (all from gfvmd's trio thread; see api.py for blocking notes):

    files = daemon.fm.files                      # gfvm.fm.api.Files
    await files.makedirs("procs/7")
    f = await files.open("procs/7/pages", create=True)
    await f.write_pages([slot * 4096, ...], pages)   # returns when master + in-sync replicas applied
    await f.fsync()                                   # returns when durable on all of them
    fd = f.local_fd()                                 # read-only fd of the local copy (native fault loop)
    nodes = await files.in_sync_nodes(["procs/7/pages", "procs/7/ckpt/core-1.img"])
    await files.promote("procs/7/pages", "n2")        # epoch + 1 by a majority
"""
