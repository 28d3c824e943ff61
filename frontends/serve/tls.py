"""TLS for `ppx-serve --ssl DIR`: DIR/cert.pem and DIR/key.pem, made as a self-signed pair
when missing (the private key is created readable by its owner alone, never wider)."""
from __future__ import annotations

import datetime
import logging
import os
import ssl
from pathlib import Path

log = logging.getLogger("ppx.serve")


def make_ssl_context(directory: str | os.PathLike) -> ssl.SSLContext:
    d = Path(directory)
    cert, key = d / "cert.pem", d / "key.pem"
    if not (cert.exists() and key.exists()):
        d.mkdir(parents=True, exist_ok=True)
        self_signed(cert, key)
        log.info("made a self-signed certificate in %s", d)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def self_signed(cert: Path, key: Path, host: str = "localhost") -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    k = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ppx-serve")])
    now = datetime.datetime.now(datetime.timezone.utc)
    c = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(k.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
         .not_valid_after(now + datetime.timedelta(days=825))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
         .sign(k, hashes.SHA256()))
    pem = k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    if key.exists():
        key.unlink()
    # created 0600, whatever the umask: the key is never readable by others, not even for a moment
    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    cert.write_bytes(c.public_bytes(serialization.Encoding.PEM))
