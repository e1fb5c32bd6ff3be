"""pidfd_open / pidfd_getfd / pidfd_send_signal through gfvm.native on native_target."""

from __future__ import annotations

import errno
import os
import select
import signal

import pytest

from gfvm import native

pytest_plugins = ["native_fixtures"]  # start_target, target_binary, tracer


def test_getfd_copies_a_file_of_the_target(start_target):
    t = start_target(4)
    pidfd = native.pidfd_open(t.pid)
    try:
        fd = native.pidfd_getfd(pidfd, 0)  # the target's stdin: the read end of our pipe
        try:
            assert os.fstat(fd).st_ino == os.fstat(t.proc.stdin.fileno()).st_ino
            assert os.get_inheritable(fd) is False
        finally:
            os.close(fd)
        with pytest.raises(OSError) as exc:
            native.pidfd_getfd(pidfd, 999)
        assert exc.value.errno == errno.EBADF
    finally:
        os.close(pidfd)


def test_send_signal_and_exit_notification(start_target):
    t = start_target(4)
    pidfd = native.pidfd_open(t.pid)
    try:
        assert not select.select([pidfd], [], [], 0)[0]
        native.pidfd_send_signal(pidfd, signal.SIGKILL)
        assert select.select([pidfd], [], [], 10)[0]  # readable once the process is gone
        assert t.proc.wait(timeout=10) == -signal.SIGKILL
    finally:
        os.close(pidfd)


def test_open_of_a_dead_process_is_esrch(start_target):
    t = start_target(4)
    pid = t.pid
    t.kill()
    with pytest.raises(ProcessLookupError):
        native.pidfd_open(pid)
