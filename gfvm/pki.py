"""Cluster PKI: a private CA per cluster, one certificate per node, TLS contexts, node bundles.

Files:
    CA directory (the operator's, never on a node):  ca.key (0600), ca.crt
    a node's TLS directory (<etc>/tls):               ca.crt, node.crt (0644), node.key (0600)
    a node bundle (one archive per node):             ca.crt, node.crt, node.key, cluster.toml

Invariants:
- A node certificate carries the node name as its subject CN *and* as its only DNS SAN, is not a
  CA, and is signed by the cluster CA. `peer_identity` accepts nothing else, so a CA certificate,
  a certificate of another CA, or one whose CN and SAN disagree never yields an identity.
- TLS contexts speak TLS 1.3 only, require a certificate from the peer in both directions, trust
  only the cluster CA (no system roots), and replace host-name checking by our node-name check
  (the glue compares `peer_identity` with the node the peer claims / we meant to reach). Servers
  issue no session tickets: every connection is a full mutual authentication.
- Keys are written 0600 and created with that mode (never briefly readable); every file is
  written atomically (temporary file, fsync, rename, fsync of the directory). Loading a node key
  that others can read is refused.
- A bundle holds exactly one key, and that key matches the bundle's certificate: a node's key is
  never in another node's bundle.

Everything here is blocking (file I/O, key generation): call it from a thread or a CLI.
"""

from __future__ import annotations

import datetime
import io
import os
import ssl
import stat
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from gfvm.config import NODE_NAME_RE, ClusterConfig
from gfvm.errors import ConfigError, GfvmError, UsageError

CA_KEY, CA_CERT = "ca.key", "ca.crt"
NODE_CERT, NODE_KEY = "node.crt", "node.key"
CLUSTER_TOML = "cluster.toml"
_BUNDLE_MEMBERS = (CA_CERT, NODE_CERT, NODE_KEY, CLUSTER_TOML)
_BUNDLE_MAX_MEMBER = 64 * 1024
_BUNDLE_MAX = 1 << 20
DEFAULT_DAYS = 3650


class IdentityError(GfvmError):
    """A peer certificate does not carry a valid node identity (or there is none)."""

    kind = "identity"


# --- files --------------------------------------------------------------------------------------


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Writes `data` to `path` atomically with permission `mode` (blocking)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)  # the umask must not widen or narrow what we asked for
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None


def _check_private(path: Path) -> None:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise ConfigError(f"{path} is readable by others (mode {mode:04o}): run chmod 600 {path}")


# --- certificates -------------------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key(seed: bytes | None = None, label: str = "") -> ec.EllipticCurvePrivateKey:
    """A fresh random P-256 key, or, with `seed`, the key derived from (seed, label).

    Derived keys let several machines that share one secret produce the same cluster CA and node
    keys independently (e.g. VMs provisioned in parallel): HKDF-SHA256(seed, info=label) mapped
    into [1, n-1]. The secret is then exactly as sensitive as the CA key."""
    if seed is None:
        return ec.generate_private_key(ec.SECP256R1())
    okm = HKDF(algorithm=hashes.SHA256(), length=48, salt=b"gfvm-pki-v1", info=label.encode()).derive(seed)
    scalar = int.from_bytes(okm, "big") % (_P256_ORDER - 1) + 1
    return ec.derive_private_key(scalar, ec.SECP256R1())


_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
MIN_SEED_BYTES = 32


def read_seed(path: Path) -> bytes:
    """The cluster secret in `path`: hex text of at least 32 bytes (e.g. `openssl rand -hex 32`)."""
    try:
        text = Path(path).read_text().strip()
    except FileNotFoundError:
        raise ConfigError(f"{path} does not exist") from None
    try:
        seed = bytes.fromhex(text)
    except ValueError:
        raise ConfigError(f"{path}: the cluster secret must be hex text") from None
    if len(seed) < MIN_SEED_BYTES:
        raise ConfigError(f"{path}: the cluster secret must have at least {MIN_SEED_BYTES} bytes")
    return seed


def _key_pem(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _check_node_name(name: str, what: str = "node name") -> None:
    if not isinstance(name, str) or not NODE_NAME_RE.match(name):
        raise UsageError(f"{what} {name!r} must match {NODE_NAME_RE.pattern}")


@dataclass(frozen=True)
class NodeCredentials:
    """What one node needs for TLS: the CA certificate, its certificate and its key (PEM)."""

    node: str
    ca_pem: bytes
    cert_pem: bytes
    key_pem: bytes

    def write(self, tls_dir: Path) -> None:
        """Writes ca.crt, node.crt (0644) and node.key (0600) into `tls_dir` (blocking)."""
        tls_dir = Path(tls_dir)
        tls_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        write_atomic(tls_dir / NODE_KEY, self.key_pem, 0o600)
        write_atomic(tls_dir / NODE_CERT, self.cert_pem, 0o644)
        write_atomic(tls_dir / CA_CERT, self.ca_pem, 0o644)

    @classmethod
    def load(cls, tls_dir: Path) -> NodeCredentials:
        """Reads and checks a node's TLS directory (blocking); ConfigError when inconsistent."""
        tls_dir = Path(tls_dir)
        key_pem = _read(tls_dir / NODE_KEY, "node key")
        _check_private(tls_dir / NODE_KEY)
        creds = cls(
            node="",
            ca_pem=_read(tls_dir / CA_CERT, "CA certificate"),
            cert_pem=_read(tls_dir / NODE_CERT, "node certificate"),
            key_pem=key_pem,
        )
        return creds._checked(str(tls_dir))

    def _checked(self, source: str) -> NodeCredentials:
        """Verifies cert <- CA, key <-> cert, and the identity; returns a copy with `node` set."""
        try:
            ca = x509.load_pem_x509_certificate(self.ca_pem)
            cert = x509.load_pem_x509_certificate(self.cert_pem)
            key = serialization.load_pem_private_key(self.key_pem, password=None)
        except ValueError as exc:
            raise ConfigError(f"{source}: unreadable certificate or key: {exc}") from None
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            raise ConfigError(
                f"{source}: node certificate is not signed by the CA certificate"
            ) from None
        if key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ):
            raise ConfigError(f"{source}: node key does not belong to the node certificate")
        try:
            node = certificate_identity(cert)
        except IdentityError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if self.node and self.node != node:
            raise ConfigError(f"{source}: certificate is for {node!r}, not {self.node!r}")
        return NodeCredentials(node, self.ca_pem, self.cert_pem, self.key_pem)


class CertificateAuthority:
    """The cluster CA: issues node certificates. Its key stays in the operator's CA directory."""

    def __init__(self, cluster: str, cert: x509.Certificate, key: Any, seed: bytes | None = None) -> None:
        self.cluster = cluster
        self.cert = cert
        self.key = key
        self.seed = seed  # set: node keys are derived from it (see _new_key)

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, node: str, *, days: int = DEFAULT_DAYS) -> NodeCredentials:
        """A new key and certificate for `node` (CN and DNS SAN = node name). Blocking (CPU)."""
        _check_node_name(node)
        key = _new_key(self.seed, f"node {self.cluster} {node}")
        now = _now()
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.cluster),
                x509.NameAttribute(NameOID.COMMON_NAME, node),
            ]
        )
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))  # tolerate clock skew
            .not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(node)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return NodeCredentials(
            node, self.cert_pem, cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)
        )


def create_ca(
    ca_dir: Path, cluster: str, *, days: int = DEFAULT_DAYS, seed: bytes | None = None
) -> CertificateAuthority:
    """Creates the cluster CA in `ca_dir` (ca.key 0600, ca.crt); refuses to replace one. Blocks.

    With `seed`, the CA key and every node key it issues are derived from that secret."""
    _check_node_name(cluster, "cluster name")
    ca_dir = Path(ca_dir)
    if (ca_dir / CA_KEY).exists() or (ca_dir / CA_CERT).exists():
        raise UsageError(
            f"a CA already exists in {ca_dir}; remove it first to start a new cluster CA"
        )
    ca_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = _new_key(seed, f"ca {cluster}")
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, cluster),
            x509.NameAttribute(NameOID.COMMON_NAME, f"gfvm cluster CA {cluster}"),
        ]
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_atomic(ca_dir / CA_KEY, _key_pem(key), 0o600)
    write_atomic(ca_dir / CA_CERT, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return CertificateAuthority(cluster, cert, key, seed)


def load_ca(ca_dir: Path) -> CertificateAuthority:
    """Loads the CA from `ca_dir` (blocking); ConfigError if missing or unreadable."""
    ca_dir = Path(ca_dir)
    key_pem = _read(ca_dir / CA_KEY, "CA key")
    _check_private(ca_dir / CA_KEY)
    try:
        cert = x509.load_pem_x509_certificate(_read(ca_dir / CA_CERT, "CA certificate"))
        key = serialization.load_pem_private_key(key_pem, password=None)
    except ValueError as exc:
        raise ConfigError(f"{ca_dir}: unreadable CA certificate or key: {exc}") from None
    orgs = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    cluster = str(orgs[0].value) if orgs else ""
    return CertificateAuthority(cluster, cert, key)


# --- identity -----------------------------------------------------------------------------------


def certificate_identity(cert: x509.Certificate | bytes) -> str:
    """The node name a node certificate (object or DER) carries; IdentityError if it is not one."""
    if isinstance(cert, (bytes, bytearray)):
        try:
            cert = x509.load_der_x509_certificate(bytes(cert))
        except ValueError as exc:
            raise IdentityError(f"unreadable peer certificate: {exc}") from None
    try:
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if basic.ca:
            raise IdentityError("peer presented a CA certificate, not a node certificate")
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1:
        raise IdentityError(f"certificate has {len(cns)} common names, expected 1")
    node = str(cns[0].value)
    if not NODE_NAME_RE.match(node):
        raise IdentityError(f"certificate name {node!r} is not a node name")
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise IdentityError(f"certificate of {node!r} has no subject alternative name") from None
    if san.get_values_for_type(x509.DNSName) != [node] or len(list(san)) != 1:
        raise IdentityError(f"certificate of {node!r}: its alternative names do not equal its CN")
    return node


def peer_identity(ssl_obj: Any) -> str:
    """The node name of the verified peer certificate of an SSLObject/SSLSocket/trio SSLStream.

    Call it after the TLS handshake; the chain has then been verified against the cluster CA.
    Never blocks."""
    der = ssl_obj.getpeercert(binary_form=True)
    if not der:
        raise IdentityError("peer presented no certificate")
    return certificate_identity(der)


# --- TLS contexts -------------------------------------------------------------------------------


def _context(tls_dir: Path, purpose: int) -> ssl.SSLContext:
    tls_dir = Path(tls_dir)
    NodeCredentials.load(tls_dir)  # fail early and clearly on a bad or unsafe directory
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    if purpose == ssl.PROTOCOL_TLS_CLIENT:
        ctx.check_hostname = False  # replaced by the node-name check in gfvm.wire.net
    else:
        ctx.num_tickets = 0  # no resumption: every connection proves its certificate again
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cafile=str(tls_dir / CA_CERT))
    ctx.load_cert_chain(str(tls_dir / NODE_CERT), str(tls_dir / NODE_KEY))
    return ctx


def server_context(tls_dir: Path) -> ssl.SSLContext:
    """A TLS 1.3 server context for `serve_peers`: mutual auth with the cluster CA. Blocking."""
    return _context(tls_dir, ssl.PROTOCOL_TLS_SERVER)


def client_context(tls_dir: Path) -> ssl.SSLContext:
    """A TLS 1.3 client context for `open_peer`: mutual auth with the cluster CA. Blocking."""
    return _context(tls_dir, ssl.PROTOCOL_TLS_CLIENT)


# --- bundles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bundle:
    """What a new node receives: its credentials and the cluster configuration text."""

    creds: NodeCredentials
    cluster_toml: str

    def install(self, etc_dir: Path) -> None:
        """Writes <etc>/tls/{ca.crt,node.crt,node.key}, <etc>/cluster.toml, <etc>/node.toml."""
        etc_dir = Path(etc_dir)
        etc_dir.mkdir(parents=True, exist_ok=True, mode=0o755)
        self.creds.write(etc_dir / "tls")
        write_atomic(etc_dir / CLUSTER_TOML, self.cluster_toml.encode(), 0o644)
        write_atomic(etc_dir / "node.toml", f'name = "{self.creds.node}"\n'.encode(), 0o644)


def make_bundle(creds: NodeCredentials, cluster_toml: str) -> bytes:
    """One node's bundle (a tar archive in memory, mode 0600 to be kept private). Never blocks.

    It contains that node's key only; the configuration must list the node."""
    creds = creds._checked(f"credentials of {creds.node!r}")
    ClusterConfig.parse(cluster_toml).node(creds.node)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        contents = {
            CA_CERT: creds.ca_pem,
            NODE_CERT: creds.cert_pem,
            NODE_KEY: creds.key_pem,
            CLUSTER_TOML: cluster_toml.encode(),
        }
        for name in _BUNDLE_MEMBERS:
            info = tarfile.TarInfo(name)
            info.size = len(contents[name])
            info.mode = 0o600 if name == NODE_KEY else 0o644
            info.mtime = 0  # same inputs, same archive
            tar.addfile(info, io.BytesIO(contents[name]))
    return buf.getvalue()


def read_bundle(data: bytes) -> Bundle:
    """Unpacks and checks a bundle in memory (nothing is extracted to disk). ConfigError if bad."""
    if len(data) > _BUNDLE_MAX:
        raise ConfigError(f"bundle of {len(data)} bytes is too large")
    files: dict[str, bytes] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            for member in tar:
                if member.name not in _BUNDLE_MEMBERS or not member.isreg():
                    raise ConfigError(f"bundle: unexpected member {member.name!r}")
                if member.name in files:
                    raise ConfigError(f"bundle: {member.name} appears twice")
                if member.size > _BUNDLE_MAX_MEMBER:
                    raise ConfigError(f"bundle: {member.name} is too large")
                f = tar.extractfile(member)
                assert f is not None
                files[member.name] = f.read()
    except tarfile.TarError as exc:
        raise ConfigError(f"bundle is not a valid archive: {exc}") from None
    missing = [n for n in _BUNDLE_MEMBERS if n not in files]
    if missing:
        raise ConfigError(f"bundle lacks {', '.join(missing)}")
    creds = NodeCredentials("", files[CA_CERT], files[NODE_CERT], files[NODE_KEY])._checked(
        "bundle"
    )
    try:
        text = files[CLUSTER_TOML].decode()
    except UnicodeDecodeError:
        raise ConfigError("bundle: cluster.toml is not UTF-8") from None
    ClusterConfig.parse(text, "bundle cluster.toml").node(creds.node)
    return Bundle(creds, text)
