"""Copies a directory of CRIU images to another node over one TCP stream (the CRIU baselines'
"copy the images to the target" step). Deliberately tiny and with no heavy imports: it runs as
`python -m gfvm.migrate.imgcopy recv DIR PORT` inside the target node and `... send DIR HOST PORT`
inside the source node, and its start-up time counts in the measured freeze.

Stream: per file a little-endian (u16 name length, u64 size), the name, the bytes; a zero name
length ends it. The receiver refuses names with '/' or '.'/'..'. Everything here blocks.
"""

from __future__ import annotations

import argparse
import os
import socket
import struct
import sys
from pathlib import Path


class CopyError(Exception):
    """The image stream was cut or malformed."""


_HEAD = struct.Struct("<HQ")


def send_dir(directory: Path, host: str, port: int) -> int:
    """Sends every regular file of `directory` to a `recv_dir` peer; returns bytes of file data."""
    total = 0
    with socket.create_connection((host, port), timeout=60) as s:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            if not entry.is_file(follow_symlinks=False):
                continue
            name = entry.name.encode()
            size = entry.stat().st_size
            s.sendall(_HEAD.pack(len(name), size) + name)
            with open(entry.path, "rb") as f:
                s.sendfile(f)
            total += size
        s.sendall(_HEAD.pack(0, 0))
    return total


def _recv_exact(conn: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = conn.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise CopyError("image stream ended early")
        buf += chunk
    return bytes(buf)


def recv_dir(directory: Path, port: int) -> None:
    """Accepts one `send_dir` stream on `port` and writes its files into `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    with socket.create_server(("0.0.0.0", port)) as server:
        print("ready", flush=True)
        conn, _ = server.accept()
        with conn:
            while True:
                name_len, size = _HEAD.unpack(_recv_exact(conn, _HEAD.size))
                if name_len == 0:
                    return
                name = _recv_exact(conn, name_len).decode()
                if "/" in name or name in (".", ".."):
                    raise CopyError(f"bad file name in image stream: {name!r}")
                with open(directory / name, "wb") as f:
                    left = size
                    while left:
                        chunk = conn.recv(min(left, 1 << 20))
                        if not chunk:
                            raise CopyError("image stream ended early")
                        f.write(chunk)
                        left -= len(chunk)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="imgcopy")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("send")
    s.add_argument("dir", type=Path)
    s.add_argument("host")
    s.add_argument("port", type=int)
    r = sub.add_parser("recv")
    r.add_argument("dir", type=Path)
    r.add_argument("port", type=int)
    args = parser.parse_args(argv)
    if args.cmd == "send":
        print(send_dir(args.dir, args.host, args.port))
    else:
        recv_dir(args.dir, args.port)
    return 0


if __name__ == "__main__":
    sys.exit(main())
