"""Certificates and keys for a secure deployment: a CA, the SuperLink's TLS certificate, node keys.

``python -m deploy.pki tls --out DIR --hosts superlink.example.org[,...] [--ips 10.0.0.5,...]``
writes ``ca.crt`` / ``ca.key`` (a private certificate authority) and ``superlink.crt`` /
``superlink.key`` (signed by it, with every host name and IP address as a Subject Alternative
Name: TLS clients check the name they dialled against these).

``python -m deploy.pki node-keys --out DIR --nodes 3`` writes one ECDSA P-384 key pair per
SuperNode, ``node-<i>`` (private, OpenSSH format, mode 0600) and ``node-<i>.pub``, the format
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read.

Keys are made with ``cryptography`` (already installed with flwr); nothing shells out to openssl
or ssh-keygen. Private keys are written 0600, and never overwritten (an existing file stops the
command), so a deployed CA is not replaced by accident.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_DAYS, CERT_DAYS = 3650, 825  # 825 days: the longest validity browsers and many TLS stacks accept


def _write(path: Path, data: bytes, private: bool) -> None:
    if path.exists():
        raise FileExistsError(f"{path} exists; refusing to overwrite a key or certificate (delete it first)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "flower-large-batch"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_tls(out: Path, hosts: list[str], ips: list[str]) -> dict[str, Path]:
    """Write a CA and a SuperLink certificate valid for ``hosts`` and ``ips``; return the paths.

    Raises
    ------
    ValueError
        If neither a host nor an IP is given, or an IP does not parse.
    """
    if not hosts and not ips:
        raise ValueError("give at least one host name or IP address the SuperLink is reached at (--hosts/--ips)")
    addresses = [ipaddress.ip_address(ip) for ip in ips]
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("flower-large-batch CA")).issuer_name(_name("flower-large-batch CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    key = ec.generate_private_key(ec.SECP384R1())
    sans = [x509.DNSName(h) for h in hosts] + [x509.IPAddress(a) for a in addresses]
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0] if hosts else ips[0])).issuer_name(ca_cert.subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=CERT_DAYS))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    paths = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "superlink.crt", "key": out / "superlink.key"}
    _write(paths["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), True)
    _write(paths["ca_cert"], ca_cert.public_bytes(pem), False)
    _write(paths["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), True)
    _write(paths["cert"], cert.public_bytes(pem), False)
    return paths


def make_node_keys(out: Path, nodes: int, prefix: str = "node") -> list[tuple[Path, Path]]:
    """Write ``nodes`` ECDSA P-384 key pairs in OpenSSH format; return (private, public) paths."""
    if nodes < 1:
        raise ValueError(f"--nodes = {nodes}: need at least 1")
    pairs = []
    for i in range(nodes):
        key = ec.generate_private_key(ec.SECP384R1())
        private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                    serialization.NoEncryption())
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        path = out / f"{prefix}-{i}"
        _write(path, private, True)
        _write(path.with_suffix(".pub"), public + f" {prefix}-{i}\n".encode(), False)
        pairs.append((path, path.with_suffix(".pub")))
    return pairs


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m deploy.pki", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    tls = sub.add_parser("tls", help="a CA and the SuperLink's TLS certificate")
    tls.add_argument("--out", required=True, type=Path)
    tls.add_argument("--hosts", default="", help="comma-separated DNS names the SuperLink is reached at")
    tls.add_argument("--ips", default="", help="comma-separated IP addresses the SuperLink is reached at")
    keys = sub.add_parser("node-keys", help="ECDSA key pairs for SuperNode authentication")
    keys.add_argument("--out", required=True, type=Path)
    keys.add_argument("--nodes", required=True, type=int)
    args = p.parse_args(argv)
    try:
        if args.what == "tls":
            split = lambda s: [x.strip() for x in s.split(",") if x.strip()]  # noqa: E731
            for name, path in make_tls(args.out, split(args.hosts), split(args.ips)).items():
                print(f"{name}: {path}")
        else:
            for private, public in make_node_keys(args.out, args.nodes):
                print(f"{private} {public}")
    except (ValueError, FileExistsError) as err:
        print(f"error: {err}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
