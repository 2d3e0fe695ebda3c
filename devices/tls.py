"""A fleet's TLS material, made with the `openssl` command: a CA, the broker's certificate and
one client certificate per login."""

from __future__ import annotations

import ipaddress
import secrets
import shutil
import subprocess
from pathlib import Path


class TLSError(RuntimeError):
    """openssl is missing or failed; the message says which step and why."""


def subject_alt_names(hosts: list[str]) -> str:
    names = []
    for h in dict.fromkeys(hosts):  # ordered, unique
        try:
            names.append(f"IP:{ipaddress.ip_address(h)}")
        except ValueError:
            names.append(f"DNS:{h}")
    return ",".join(names)


_OPENSSL_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = heron
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid:always
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
subjectAltName = {sans}
[client_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = clientAuth
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid, issuer
"""
_EC_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(binary: str, args: list[str], cwd: Path) -> None:
    try:
        proc = subprocess.run([binary, *args], cwd=cwd, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise TLSError(f"openssl {args[0]} failed: {exc}") from exc
    if proc.returncode != 0:
        raise TLSError(f"openssl {' '.join(args[:2])} failed: {proc.stderr.strip()[-800:]}"
                             "; help: heron needs OpenSSL 1.1.1 or newer")


def make_tls(work: Path, sans: str, clients: list[tuple[str, str]], days: int) -> None:
    """ca.{crt,key}, server.{crt,key} and client-<name>.{crt,key} per client, in `work`."""
    binary = shutil.which("openssl")
    if binary is None:
        raise TLSError("--tls needs the `openssl` command to make the CA and certificates; "
                             "help: install it (apt-get install openssl), or provision without "
                             "--tls")
    (work / "openssl.cnf").write_text(_OPENSSL_CONF.format(sans=sans))
    cnf = ["-config", "openssl.cnf"]
    _openssl(binary, ["req", "-x509", *cnf, "-extensions", "ca_ext", *_EC_KEY,
                      "-keyout", "ca.key", "-out", "ca.crt", "-days", str(days),
                      "-subj", "/CN=heron fleet CA"], work)
    leaves = [("server", "server_ext", sans.split(",")[0].split(":", 1)[1]),
              *((f"client-{name}", "client_ext", cn) for name, cn in clients)]
    for name, ext, cn in leaves:
        _openssl(binary, ["req", "-new", *cnf, *_EC_KEY, "-keyout", f"{name}.key",
                          "-out", f"{name}.csr", "-subj", f"/CN={cn}"], work)
        _openssl(binary, ["x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt",
                          "-CAkey", "ca.key", "-set_serial", str(secrets.randbits(120)),
                          "-days", str(days), "-extfile", "openssl.cnf", "-extensions", ext,
                          "-out", f"{name}.crt"], work)
