"""What `heron devices provision` writes for one fleet's broker: every login's credentials
file, the Mosquitto password file, the ACL, the config and (with --tls) the CA and
certificates, all into a staging folder.

`devices.provision` checks the options, holds the lock and swaps these files into DIR.
TLSError (openssl failed) comes out as is; the provision reports it with what was kept.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import TYPE_CHECKING

from devices import tls
from devices.mosquitto import SERVER_USER, WILDCARD_HOSTS, acl_text, mosquitto_conf, mosquitto_hash
from edge_runtime.files import atomic_write, fsync_dir

if TYPE_CHECKING:
    from devices.provision import ProvisionOptions

SERVER_CREDENTIALS = "server"  # DIR/credentials/server.json
PASSWORD_BYTES = 24


def _write(path: Path, text: str, mode: int) -> None:
    atomic_write(path, text.encode(), mode)


def _fsync(path: Path) -> None:
    """Flush a file to disk before a rename makes it the live one."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def stage_files(opts: ProvisionOptions, out: Path, stage: Path, url: str, advertise: str,
                port: int, user: str | None, owner: tuple[int, int, set[int]] | None,
                ) -> tuple[dict[str, Path], Path | None]:
    """Write everything `devices.provision.SWAPPED` names into stage/new, naming the final
    paths in OUT inside the files; returns (name -> final credentials path, final CA path)."""
    new = stage / "new"
    new.mkdir(mode=0o700)
    creds_dir, tls_dir = new / "credentials", new / "tls"
    creds_dir.mkdir(mode=0o700)
    ca_file: Path | None = None
    certs: dict[str, tuple[Path, Path]] = {}
    if opts.tls:
        hosts = [advertise] + ([opts.host] if opts.host not in WILDCARD_HOSTS else [])
        clients = ([(SERVER_CREDENTIALS, SERVER_USER)] + [(d, d) for d in opts.device_ids]
                   if opts.client_certs else [])
        work = stage / "openssl"
        work.mkdir(mode=0o700)
        tls.make_tls(work, tls.subject_alt_names([*hosts, "127.0.0.1", "localhost"]),
                     clients, opts.days)
        tls_dir.mkdir(mode=0o755)
        moves = [(name, tls_dir, 0o644) for name in ("ca.crt", "server.crt")]
        moves += [(name, tls_dir, 0o600) for name in ("ca.key", "server.key")]
        moves += [(f"client-{name}.{ext}", creds_dir, 0o600)
                  for name, _ in clients for ext in ("crt", "key")]
        for name, folder, mode in moves:
            os.chmod(work / name, mode)
            _fsync(work / name)
            os.replace(work / name, folder / name.removeprefix("client-"))
        for name, _ in clients:
            certs[name] = (out / "credentials" / f"{name}.crt",
                           out / "credentials" / f"{name}.key")
        ca_file = out / "tls" / "ca.crt"

    logins = {SERVER_CREDENTIALS: SERVER_USER, **{d: d for d in opts.device_ids}}
    entries, paths = [], {}
    for name, username in logins.items():
        password = secrets.token_urlsafe(PASSWORD_BYTES)
        entries.append(f"{username}:{mosquitto_hash(password)}")
        obj: dict[str, str] = {"username": username, "password": password, "broker": url,
                               "prefix": opts.prefix}
        if ca_file is not None:
            obj["ca_file"] = str(ca_file)
        if name in certs:
            obj["cert_file"], obj["key_file"] = (str(p) for p in certs[name])
        _write(creds_dir / f"{name}.json", json.dumps(obj, indent=2) + "\n", 0o600)
        paths[name] = out / "credentials" / f"{name}.json"

    passwd, acl = new / "passwd", new / "acl"
    _write(passwd, "\n".join(entries) + "\n", 0o600)
    _write(acl, acl_text(list(opts.device_ids), opts.prefix), 0o600)
    _write(new / "mosquitto.conf", mosquitto_conf(out, port, opts.host, user, tls=opts.tls,
                                                  client_certs=opts.client_certs), 0o644)
    if owner is not None:  # the broker reads these after dropping root
        broker_files = [passwd, acl] + ([tls_dir / "server.key"] if opts.tls else [])
        for path in broker_files:
            os.chown(path, owner[0], owner[1])
    for folder in (creds_dir, *([tls_dir] if opts.tls else [])):
        fsync_dir(folder)
    return paths, ca_file
