"""gfvm.pki: cluster CA, node certificates, TLS contexts, node bundles."""

from __future__ import annotations

import datetime
import io
import os
import ssl
import stat
import tarfile

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gfvm import pki
from gfvm.config import NodePaths, this_node_name
from gfvm.errors import ConfigError, UsageError

CLUSTER_TOML = """
[cluster]
name = "test"
replicas = 2

[[node]]
name = "n1"
address = "10.77.0.1"

[[node]]
name = "n2"
address = "10.77.0.2"
"""


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def ca(tmp_path):
    return pki.create_ca(tmp_path / "ca", "test")


def test_create_ca_writes_a_private_key_and_a_certificate(tmp_path, ca):
    assert mode(tmp_path / "ca" / "ca.key") == 0o600
    assert mode(tmp_path / "ca" / "ca.crt") == 0o644
    loaded = pki.load_ca(tmp_path / "ca")
    assert loaded.cluster == "test"
    assert loaded.cert == ca.cert
    assert ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_create_ca_refuses_to_replace_an_existing_ca(tmp_path, ca):
    before = (tmp_path / "ca" / "ca.key").read_bytes()
    with pytest.raises(UsageError, match="already exists"):
        pki.create_ca(tmp_path / "ca", "test")
    assert (tmp_path / "ca" / "ca.key").read_bytes() == before


def test_create_ca_refuses_a_bad_cluster_name(tmp_path):
    with pytest.raises(UsageError, match="cluster name"):
        pki.create_ca(tmp_path / "ca", "../evil")


def test_modes_do_not_depend_on_the_umask(tmp_path, ca):
    old = os.umask(0o077)
    try:
        ca.issue("n1").write(tmp_path / "n1")
    finally:
        os.umask(old)
    assert mode(tmp_path / "n1" / "node.crt") == 0o644
    assert mode(tmp_path / "n1" / "node.key") == 0o600
    assert not [p for p in (tmp_path / "n1").iterdir() if p.name.startswith(".")]


def test_node_certificate_carries_the_name_in_cn_and_san(tmp_path, ca):
    creds = ca.issue("n1")
    cert = x509.load_pem_x509_certificate(creds.cert_pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "n1"
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["n1"]
    assert pki.certificate_identity(cert) == "n1"
    creds.write(tmp_path / "n1")
    assert pki.NodeCredentials.load(tmp_path / "n1").node == "n1"


@pytest.mark.parametrize("bad", ["N1", "n1/../n2", "", "n" * 40, "n1\x00"])
def test_issue_refuses_invalid_node_names(ca, bad):
    with pytest.raises(UsageError):
        ca.issue(bad)


def test_load_refuses_a_key_readable_by_others(tmp_path, ca):
    ca.issue("n1").write(tmp_path / "n1")
    os.chmod(tmp_path / "n1" / "node.key", 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        pki.NodeCredentials.load(tmp_path / "n1")
    with pytest.raises(ConfigError):
        pki.server_context(tmp_path / "n1")


def test_load_refuses_a_certificate_of_another_ca(tmp_path, ca):
    other = pki.create_ca(tmp_path / "other", "test")
    ca.issue("n1").write(tmp_path / "n1")
    pki.write_atomic(tmp_path / "n1" / "ca.crt", other.cert_pem, 0o644)
    with pytest.raises(ConfigError, match="not signed by the CA"):
        pki.NodeCredentials.load(tmp_path / "n1")


def test_load_refuses_a_key_of_another_node(tmp_path, ca):
    ca.issue("n1").write(tmp_path / "n1")
    pki.write_atomic(tmp_path / "n1" / "node.key", ca.issue("n2").key_pem, 0o600)
    with pytest.raises(ConfigError, match="does not belong"):
        pki.NodeCredentials.load(tmp_path / "n1")


def test_load_of_a_missing_directory_says_what_is_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        pki.NodeCredentials.load(tmp_path / "nothing")


def _forge(ca, *, cn, sans, is_ca=False):
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if sans is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(s) for s in sans]), critical=False
        )
    return builder.sign(ca.key, hashes.SHA256())


@pytest.mark.parametrize(
    "cn,sans,is_ca,match",
    [
        ("n1", ["n2"], False, "do not equal its CN"),
        ("n1", ["n1", "n2"], False, "do not equal its CN"),
        ("n1", None, False, "no subject alternative name"),
        ("Node One", ["Node One"], False, "not a node name"),
        ("n1", ["n1"], True, "CA certificate"),
    ],
)
def test_certificate_identity_refuses_anything_but_a_node_certificate(ca, cn, sans, is_ca, match):
    with pytest.raises(pki.IdentityError, match=match):
        pki.certificate_identity(_forge(ca, cn=cn, sans=sans, is_ca=is_ca))


def test_certificate_identity_refuses_the_ca_certificate(ca):
    with pytest.raises(pki.IdentityError, match="CA certificate"):
        pki.certificate_identity(ca.cert)


def test_certificate_identity_refuses_garbage():
    with pytest.raises(pki.IdentityError, match="unreadable"):
        pki.certificate_identity(b"\x30\x03garbage")


def test_peer_identity_without_a_certificate():
    class NoCert:
        def getpeercert(self, binary_form=False):
            return None

    with pytest.raises(pki.IdentityError, match="no certificate"):
        pki.peer_identity(NoCert())


@pytest.mark.parametrize("make", [pki.server_context, pki.client_context])
def test_contexts_are_tls13_only_with_mutual_verification(tmp_path, ca, make):
    ca.issue("n1").write(tmp_path / "n1")
    ctx = make(tmp_path / "n1")
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.maximum_version == ssl.TLSVersion.TLSv1_3
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname is False
    # only our CA is trusted: no system roots
    assert len(ctx.get_ca_certs()) == 1


def test_server_context_issues_no_session_tickets(tmp_path, ca):
    ca.issue("n1").write(tmp_path / "n1")
    assert pki.server_context(tmp_path / "n1").num_tickets == 0


# --- bundles --------------------------------------------------------------------------------------


def members(bundle: bytes) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(bundle)) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def test_bundle_round_trips_and_installs(tmp_path, ca):
    creds = ca.issue("n1")
    bundle = pki.read_bundle(pki.make_bundle(creds, CLUSTER_TOML))
    assert bundle.creds == creds
    assert bundle.cluster_toml == CLUSTER_TOML
    etc = tmp_path / "etc"
    bundle.install(etc)
    paths = NodePaths(etc=etc)
    assert this_node_name(paths) == "n1"
    assert pki.NodeCredentials.load(paths.tls_dir) == creds
    assert mode(paths.tls_dir / "node.key") == 0o600
    assert paths.cluster_toml.read_text() == CLUSTER_TOML


def test_a_bundle_holds_only_its_own_key(ca):
    n1, n2 = ca.issue("n1"), ca.issue("n2")
    data = pki.make_bundle(n1, CLUSTER_TOML)
    assert sorted(members(data)) == ["ca.crt", "cluster.toml", "node.crt", "node.key"]
    assert members(data)["node.key"] == n1.key_pem
    body = b"".join(n2.key_pem.splitlines()[1:-1])
    assert body not in data.replace(b"\n", b"")
    assert ca.key.private_numbers().private_value.to_bytes(32, "big") not in data


def test_make_bundle_refuses_mismatched_credentials(ca):
    n1, n2 = ca.issue("n1"), ca.issue("n2")
    mixed = pki.NodeCredentials("n1", n1.ca_pem, n1.cert_pem, n2.key_pem)
    with pytest.raises(ConfigError, match="does not belong"):
        pki.make_bundle(mixed, CLUSTER_TOML)


def test_make_bundle_refuses_a_node_missing_from_the_config(ca):
    with pytest.raises(ConfigError, match="unknown node 'n3'"):
        pki.make_bundle(ca.issue("n3"), CLUSTER_TOML)


def _tar(entries) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def _file(name: str, data: bytes):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


def _valid_entries(ca):
    m = members(pki.make_bundle(ca.issue("n1"), CLUSTER_TOML))
    return [_file(name, data) for name, data in m.items()]


def test_read_bundle_refuses_path_escapes_and_extra_members(ca):
    for name in ("../node.key", "/etc/passwd", "tls/node.key", "extra"):
        with pytest.raises(ConfigError, match="unexpected member"):
            pki.read_bundle(_tar(_valid_entries(ca) + [_file(name, b"x")]))


def test_read_bundle_refuses_links(ca):
    link = tarfile.TarInfo("node.key")
    link.type = tarfile.SYMTYPE
    link.linkname = "/etc/shadow"
    entries = [e for e in _valid_entries(ca) if e[0].name != "node.key"] + [(link, None)]
    with pytest.raises(ConfigError, match="unexpected member"):
        pki.read_bundle(_tar(entries))


def test_read_bundle_refuses_duplicates_and_missing_members(ca):
    entries = _valid_entries(ca)
    with pytest.raises(ConfigError, match="twice"):
        pki.read_bundle(_tar(entries + [entries[0]]))
    with pytest.raises(ConfigError, match="lacks node.key"):
        pki.read_bundle(_tar([e for e in entries if e[0].name != "node.key"]))


def test_read_bundle_refuses_another_nodes_key(ca):
    other = ca.issue("n2").key_pem
    entries = [
        e if e[0].name != "node.key" else _file("node.key", other) for e in _valid_entries(ca)
    ]
    with pytest.raises(ConfigError, match="does not belong"):
        pki.read_bundle(_tar(entries))


def test_read_bundle_refuses_garbage_and_oversize():
    with pytest.raises(ConfigError, match="not a valid archive"):
        pki.read_bundle(b"this is not a tar archive" * 40)
    with pytest.raises(ConfigError, match="too large"):
        pki.read_bundle(bytes(2 << 20))
