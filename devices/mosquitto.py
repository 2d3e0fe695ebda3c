"""The files a Mosquitto 2 broker reads: password hashes, the ACL and the config.

Written here, with the standard library only, so that provisioning needs no Mosquitto tools
and the ACL is built from the same `topics` the device subscribes with.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
from pathlib import Path

from edge_runtime.protocol import topics

SERVER_USER = "heron-server"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
# Mosquitto 2's own defaults for `$7$` (PBKDF2-HMAC-SHA512) hashes: see mosquitto_passwd.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12


# -- Mosquitto password hashes ----------------------------------------------------------------
def mosquitto_hash(password: str, *, salt: bytes | None = None,
                   iterations: int = PBKDF2_ITERATIONS) -> str:
    """`$7$ITER$SALT$HASH`, what `mosquitto_passwd` 2.x writes after `user:`."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return (f"$7${iterations}${base64.b64encode(salt).decode()}$"
            f"{base64.b64encode(digest).decode()}")


def check_mosquitto_hash(password: str, hashed: str) -> bool:
    """True if `hashed` (a `$7$` entry, as mosquitto_passwd writes it) is `password`'s."""
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        raise ValueError(f"not a Mosquitto $7$ hash: {hashed[:20]!r}…")
    salt, want = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    got = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, int(parts[2]))
    return secrets.compare_digest(got, want)


# -- ACL --------------------------------------------------------------------------------------
def device_acl(device_id: str, prefix: str = topics.DEFAULT_PREFIX) -> tuple[list[str], list[str]]:
    """(topics the device may publish, topic filters it may read), built from `topics`.

    Writes are the exact uplink topics and its presence (its last will); reads are exactly
    the filters the device subscribes to, so the ACL and the device cannot drift apart.
    """
    write = [topics.up(device_id, kind, prefix) for kind in topics.UP_KINDS]
    write.append(topics.device_status(device_id, prefix))
    return write, topics.device_subscriptions(device_id, prefix)


def acl_text(device_ids: list[str], prefix: str = topics.DEFAULT_PREFIX) -> str:
    """Mosquitto ACL: the server owns the prefix; a device only its own topics. No anonymous."""
    lines = ["# heron broker ACL, written by `heron devices provision`.",
             "# Anything not listed is denied: publishes are dropped, subscriptions refused.",
             "", f"user {SERVER_USER}", f"topic readwrite {prefix}/#"]
    for dev in device_ids:
        write, read = device_acl(dev, prefix)
        lines += ["", f"user {dev}"]
        lines += [f"topic write {t}" for t in write]
        lines += [f"topic read {t}" for t in read]
    return "\n".join(lines) + "\n"


def mosquitto_conf(out: Path, port: int, host: str, user: str | None, *, tls: bool = False,
                   client_certs: bool = False) -> str:
    lines = [
        "# heron broker, written by `heron devices provision`. Start: mosquitto -c "
        f"{out / 'mosquitto.conf'}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "persistence false",
    ]
    if user is not None:
        lines += ["# the account the broker runs as when started as root; it reads passwd, acl "
                  "and the TLS key", f"user {user}"]
    # Listener options must follow their `listener` line: before it, Mosquitto would open
    # an extra default listener on port 1883 for them.
    lines += [f"listener {port} {host}" if host not in WILDCARD_HOSTS else f"listener {port}",
              "# the client id is the username: nobody can take over (or kick off) another's "
              "session", "use_username_as_clientid true"]
    if tls:
        tls_dir = out / "tls"
        lines += [f"cafile {tls_dir / 'ca.crt'}", f"certfile {tls_dir / 'server.crt'}",
                  f"keyfile {tls_dir / 'server.key'}", "tls_version tlsv1.2",
                  f"require_certificate {'true' if client_certs else 'false'}"]
    return "\n".join(lines) + "\n"
