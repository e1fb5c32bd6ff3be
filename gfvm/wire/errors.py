"""Errors of the peer protocol.

Two families, kept apart on purpose (as in h11):
- `LocalProtocolError`: *we* tried to build or send something invalid (a bug in our code, or a
  value that cannot be represented). Nothing was sent; the connection is still usable.
- `RemoteProtocolError`: the *peer* sent something invalid (malformed, oversized, unknown type,
  wrong state, bad magic/version, trailing bytes...). The connection is dead: the glue logs one
  line and closes it. Nothing from the bad frame reaches the application.

The glue (`gfvm.wire.net`) adds errors the application sees on a channel: `ChannelClosed` (the
connection is gone; an `Unavailable`), `ConnectFailed` and `RemoteFailure` (the peer answered a
request with an `ErrorReply`).
"""

from __future__ import annotations

import errno as _errno

from gfvm.errors import GfvmError, Unavailable


class ProtocolError(GfvmError):
    """Base of the protocol errors; never user-facing as such."""

    kind = "protocol"


class LocalProtocolError(ProtocolError):
    """We tried to construct or send something the protocol does not allow. Nothing was sent."""

    errno = _errno.EINVAL


class RemoteProtocolError(ProtocolError):
    """The peer violated the protocol; the connection must be closed.

    `reply`, when not None, is a frame (bytes) the server should send before closing: a
    HELLO_REJECT telling a misconfigured but authenticated peer why it was refused.
    """

    errno = _errno.EPROTO

    def __init__(self, message: str, *, reply: bytes | None = None) -> None:
        super().__init__(message)
        self.reply = reply


class HandshakeRejected(RemoteProtocolError):
    """The peer refused our HELLO and said why (`reason`)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"peer rejected the handshake: {reason}")
        self.reason = reason


class ChannelClosed(Unavailable):
    """The peer connection is closed (by either side, or because it broke)."""

    kind = "channel-closed"


class ConnectFailed(Unavailable):
    """Could not open an authenticated channel to a peer (network, TLS, identity or handshake)."""

    kind = "connect-failed"


class RemoteFailure(GfvmError):
    """The peer answered a request with an `ErrorReply(errno, message)`."""

    kind = "remote-failure"

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
