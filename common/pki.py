"""The testbed's CA and one key and certificate per process (``security.mode = "tls"``).

``python -m scripts.certs --config testbed.toml`` (``ensure``) writes into ``security.certs`` (default ``certs/`` beside the config file): ``ca.crt``
and ``ca.key`` (the CA: keep ``ca.key`` on this machine only, it signs certificates),
then ``<who>.crt`` and ``<who>.key`` for the central, the controller, every edge and
every device. A certificate names its process: organizational unit = role, common name =
name, so a process can act only as itself. Then it says which files go to which host.

``ensure(cfg)`` makes whatever is missing (the launcher, ``make demo`` and the container
set-up call it, so TLS works on first use); files already there are kept.
"""

from __future__ import annotations

import datetime
import os

from common.config import Config
from common.errors import ConfigError
from common.security import Identity, tls_files

# Ten years: a testbed's certificates must not expire mid-experiment (scripts.certs makes new ones).
VALID_DAYS = 3650


def _crypto():
    try:
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
    except ImportError:  # pragma: no cover - a dependency of the package
        raise ConfigError("security.certs", "making certificates needs the 'cryptography' package",
                          "pip install cryptography (or: make venv)") from None
    return x509, hashes, serialization, ec, ExtendedKeyUsageOID, NameOID


def _write(path: str, data: bytes, mode: int) -> None:
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _new_ca(out: str):
    x509, hashes, serialization, ec, _, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfly testbed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "fedfly testbed CA")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    _write(os.path.join(out, "ca.key"), key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()), 0o600)
    _write(os.path.join(out, "ca.crt"), cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return key, cert


def _load_ca(out: str):
    x509, _, serialization, *_ = _crypto()
    with open(os.path.join(out, "ca.key"), "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=None)
    with open(os.path.join(out, "ca.crt"), "rb") as f:
        cert = x509.load_pem_x509_certificate(f.read())
    return key, cert


def issue(out: str, identity: Identity, ca_key, ca_cert) -> None:
    """A key and a certificate for ``identity``, signed by the CA."""
    x509, hashes, serialization, ec, EKU, NameOID = _crypto()
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfly testbed"),
                         x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.role),
                         x509.NameAttribute(NameOID.COMMON_NAME, identity.name)])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([EKU.SERVER_AUTH, EKU.CLIENT_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    files = tls_files(out, identity)
    _write(files["key"], key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()), 0o600)
    _write(files["cert"], cert.public_bytes(serialization.Encoding.PEM), 0o644)


def ensure(cfg: Config, out: str | None = None, *, force: bool = False) -> list[Identity]:
    """Make the CA (if missing) and every missing key and certificate; returns whose
    were made. ``force``: make everything anew (a new CA: every host needs its files again)."""
    out = out or cfg.certs_dir()
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as exc:
        raise ConfigError("security.certs", f"cannot make {out}: {exc.strerror}", "point it at a writable folder") from None
    have_ca = all(os.path.isfile(os.path.join(out, f)) for f in ("ca.crt", "ca.key"))
    if force or not have_ca:
        ca_key, ca_cert = _new_ca(out)
        force = True  # certificates of another CA would not verify
    else:
        ca_key, ca_cert = _load_ca(out)
    made = []
    for who in cfg.identities():
        files = tls_files(out, who)
        if force or not (os.path.isfile(files["cert"]) and os.path.isfile(files["key"])):
            issue(out, who, ca_key, ca_cert)
            made.append(who)
    return made


def where(cfg: Config, who: Identity) -> str:
    if who.role == "central":
        return cfg.central.host
    if who.role == "edge":
        return cfg.edges[who.name].host
    if who.role == "device":
        return cfg.devices[who.name].host
    return "the host you run the mobility controller on"


def prepare(cfg: Config, *, make: bool = True) -> None:
    """Check, before any process starts, that this machine can secure the testbed's
    connections: in the ``tls`` mode make what certificates are missing (``make``) and
    load each; in the ``key`` mode read the key. Raises ``ConfigError``."""
    if cfg.security_mode == "tls":
        if make:
            ensure(cfg)
        for who in cfg.identities():
            cfg.credentials(who)
    else:
        cfg.key()
