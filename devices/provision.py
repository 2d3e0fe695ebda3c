"""Provision a Mosquitto 2 broker for one heron fleet: credentials, password file, ACL, config.

`heron devices provision --out DIR dev-0 dev-1` writes everything a locked-down broker needs::

    DIR/credentials/<id>.json   {"username", "password", "broker", "prefix"[, "ca_file", ...]}
    DIR/credentials/server.json the server's login (it may read and write the whole prefix)
    DIR/passwd                  Mosquitto 2 password file (PBKDF2-SHA512, made here, no tool)
    DIR/acl                     each device writes only its own uplink and presence and reads
                                only its own downlink, the broadcasts and the server's presence
    DIR/mosquitto.conf          `mosquitto -c DIR/mosquitto.conf` runs it as is
    DIR/tls/                    with --tls: a fresh CA and the broker's certificate (openssl)

The broker reads passwd, acl and the TLS key after it has dropped root, so the config names the
account it runs as (`user`, default: whoever provisioned) and those files belong to it; secrets
are never world-readable. Only the standard library and `openssl` (for --tls) are needed, so a
device-only install can provision too.

`--force` replaces all of it at once: everything is made in a staging folder inside DIR and
swapped in by renames only when complete, so a failure part-way (openssl, a full disk, Ctrl-C)
leaves the previous credentials exactly as they were and the deployed devices logged in.

What goes into those files is `devices.provision_files`'s; this module checks the options,
finds the broker's account, and does the locking, staging and swapping below.

One provision at a time writes a DIR: each holds an exclusive lock on DIR/.provision.lock (removed
when it ends) and another one fails at once. A staging folder (`DIR/.provision-*`) that is there
when the lock is free was left by a provision that was killed (SIGKILL, power loss), so it holds
replaced or never-used credentials: the next provision that goes ahead removes it and says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from devices import tls
from devices.mosquitto import SERVER_USER, WILDCARD_HOSTS
from devices.provision_files import SERVER_CREDENTIALS, stage_files
from edge_runtime.files import fsync_dir
from edge_runtime.protocol import topics

CERT_DAYS = 825


class ProvisionError(Exception):
    """Provisioning cannot go ahead; the message says why and what to do."""


# -- options and result -----------------------------------------------------------------------
@dataclass(frozen=True)
class ProvisionOptions:
    out: Path
    device_ids: tuple[str, ...]
    port: int | None = None  # default 1883, or 8883 with TLS
    prefix: str = topics.DEFAULT_PREFIX
    host: str = "127.0.0.1"  # the listener binds here
    advertise: str | None = None  # the host in the broker URL (default: host)
    tls: bool = False
    client_certs: bool = False  # with tls: every client also needs a certificate from the CA
    broker_user: str | None = None  # account the broker runs as (default: the current one)
    days: int = CERT_DAYS
    force: bool = False


@dataclass(frozen=True)
class Provisioned:
    out: Path
    broker_url: str
    prefix: str
    conf: Path
    credentials: dict[str, Path]  # device id (or "server") -> its credentials file
    ca_file: Path | None
    broker_user: str | None
    notes: list[str] = field(default_factory=list)


def _check(opts: ProvisionOptions) -> None:
    if not opts.device_ids:
        raise ProvisionError("no device ids given; help: heron devices provision --out DIR "
                             "dev-0 dev-1 ...")
    try:
        topics.validate_prefix(opts.prefix)
        for dev in opts.device_ids:
            topics.validate_id(dev)
    except ValueError as exc:
        raise ProvisionError(str(exc)) from exc
    if any(c.isspace() or c == "%" for c in opts.prefix):
        raise ProvisionError(f"topic prefix {opts.prefix!r} may not hold whitespace or '%' in "
                             "a Mosquitto ACL; help: pick another --prefix")
    dupes = sorted({d for d in opts.device_ids if opts.device_ids.count(d) > 1})
    if dupes:
        raise ProvisionError(f"device ids given twice: {', '.join(dupes)}")
    if SERVER_USER in opts.device_ids or SERVER_CREDENTIALS in opts.device_ids:
        raise ProvisionError(f"device ids {SERVER_USER!r} and {SERVER_CREDENTIALS!r} are "
                             "reserved for the server's login; help: rename that device")
    if opts.port is not None and not 0 < opts.port < 65536:
        raise ProvisionError(f"--port {opts.port} is not a TCP port (1-65535)")
    if opts.client_certs and not opts.tls:
        raise ProvisionError("--client-certs needs --tls")
    if opts.days < 1:
        raise ProvisionError("--days must be at least 1")


def _current_user() -> str | None:
    try:
        import pwd
    except ImportError:  # not POSIX: Mosquitto has no `user` setting there
        return None
    return pwd.getpwuid(os.geteuid()).pw_name


def _can_traverse(path: Path, uid: int, gids: set[int]) -> Path | None:
    """The first folder on the way to `path` that account (uid, gids) cannot enter, if any.

    Folders that do not exist yet are skipped (checked again once made)."""
    for folder in [*reversed(path.parents), path]:
        if not folder.exists():
            break
        st = folder.stat()
        mode = st.st_mode
        ok = (st.st_uid == uid and mode & stat.S_IXUSR) or \
            (st.st_gid in gids and mode & stat.S_IXGRP) or mode & stat.S_IXOTH
        if not ok:
            return folder
    return None


def _broker_account(opts: ProvisionOptions,
                    out: Path) -> tuple[str | None, tuple[int, int, set[int]] | None]:
    """(name for the config's `user` line, (uid, gid, groups) of that account if it is not
    the current one: the broker's files are then chowned to it)."""
    current = _current_user()
    user = opts.broker_user or current
    if current is None or user == current:
        return user, None
    import grp
    import pwd

    if os.geteuid() != 0:
        raise ProvisionError(f"--broker-user {user} needs root, to give that account the files "
                             f"the broker reads; help: run as root, or provision as {user} "
                             "without --broker-user")
    try:
        pw = pwd.getpwnam(user)
    except KeyError as exc:
        raise ProvisionError(f"--broker-user {user}: no such account; help: create it or "
                             "leave the option out") from exc
    gids = {pw.pw_gid, *(g.gr_gid for g in grp.getgrall() if user in g.gr_mem)}
    account = (pw.pw_uid, pw.pw_gid, gids)
    _check_reachable(out, user, account)
    return user, account


def _check_reachable(out: Path, user: str, account: tuple[int, int, set[int]]) -> None:
    blocked = _can_traverse(out, account[0], account[2])
    if blocked is not None:
        raise ProvisionError(f"the broker account {user} cannot enter {blocked}, so it could "
                             f"not read {out}/passwd; help: pick an --out that {user} can reach "
                             f"(e.g. /etc/heron) or `chmod o+x {blocked}`")


def _url(host: str, port: int, tls: bool) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{'mqtts' if tls else 'mqtt'}://{shown}:{port}"


# -- the whole job ------------------------------------------------------------------------
# What `provision` owns in OUT, swapped in this order; anything else there is left alone.
SWAPPED = ("credentials", "tls", "passwd", "acl", "mosquitto.conf")
# The staging folders (tempfile.mkdtemp prefix; the replaced files go into one's `old/`) and
# the lock file, which must not match the prefix.
STAGE_PREFIX = ".provision-"
LOCK_FILE = ".provision.lock"


class _Stuck(ProvisionError):
    """The swap failed and could not be undone; the message says where the old files are."""


class _Busy(ProvisionError):
    """Another provision holds OUT's lock; nothing was touched."""


def provision(opts: ProvisionOptions) -> Provisioned:
    """Everything is made in a staging folder inside OUT and swapped in only once complete:
    if anything fails (openssl, a full disk, Ctrl-C) the previous credentials stay as they were,
    so the deployed devices keep working."""
    _check(opts)
    out = opts.out.resolve()
    user, owner = _broker_account(opts, out)
    port = opts.port or (8883 if opts.tls else 1883)
    advertise = opts.advertise or (socket.gethostname() if opts.host in WILDCARD_HOSTS
                                   else opts.host)
    url = _url(advertise, port, opts.tls)
    notes = []
    if user == "root":
        notes.append("the broker will run as root, the owner of these files; help: "
                     "--broker-user mosquitto (as root) lets it drop privileges")

    made = [p for p in (out, *out.parents) if not p.exists()]  # deepest first
    previous = any(os.path.lexists(out / name) for name in SWAPPED)
    kept = (f"the previous credentials in {out} are unchanged" if previous
            else f"nothing was left in {out}")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with _locked(out):  # released (and its file removed) before the folders are
            creds_dir = out / "credentials"
            if creds_dir.is_dir() and any(creds_dir.glob("*.json")) and not opts.force:
                raise ProvisionError(f"{creds_dir} already exists; help: pass --force to "
                                     "replace every credential there (old passwords stop "
                                     "working), or another --out")
            notes += _remove_leftovers(out)
            if owner is not None and user is not None:
                _check_reachable(out, user, owner)  # the folders just made, under this umask
            stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=out))  # 0700, same fs
            try:
                paths, ca_file = stage_files(opts, out, stage, url, advertise, port, user, owner)
                _swap_in(stage / "new", stage / "old", out)
            except _Stuck:
                raise
            except BaseException:
                shutil.rmtree(stage, ignore_errors=True)
                raise
            try:
                shutil.rmtree(stage)  # the replaced credentials, and openssl's work files
            except OSError as exc:
                notes.append(f"could not remove {stage}, which holds the replaced credentials: "
                             f"{exc}; help: rm -rf {stage}")
    except (_Stuck, _Busy):
        raise  # a stuck swap's old files are in its staging folder, which must stay
    except (ProvisionError, OSError, tls.TLSError) as exc:
        _remove_empty(made)
        raise ProvisionError(f"{exc}; {kept}") from exc
    except BaseException as exc:  # Ctrl-C
        _remove_empty(made)
        if isinstance(exc, KeyboardInterrupt):
            raise KeyboardInterrupt(kept) from exc  # the CLI tells the user what was kept
        raise
    return Provisioned(out, url, opts.prefix, out / "mosquitto.conf", paths, ca_file, user, notes)


def _swap_in(new: Path, old: Path, out: Path) -> None:
    """Move what is in `new` into `out`, the files it replaces into `old`. Every step is a
    rename on one filesystem; on a failure part-way (Ctrl-C included) the undo reads where
    things are rather than a log, so an interrupt between a rename and its bookkeeping is
    undone too."""
    staged = [name for name in SWAPPED if os.path.lexists(new / name)]
    old.mkdir(mode=0o700)
    try:
        for name in SWAPPED:
            target = out / name
            if os.path.lexists(target):
                if target.is_dir() and not target.is_symlink():
                    os.rename(target, old / name)
                else:
                    try:  # the old file stays live until the new one replaces it
                        os.link(target, old / name, follow_symlinks=False)
                    except (OSError, NotImplementedError):  # no hard links here
                        os.rename(target, old / name)
            if name in staged:
                os.replace(new / name, target)
    except BaseException as exc:
        try:
            for name in reversed(SWAPPED):
                if name in staged and not os.path.lexists(new / name):
                    os.replace(out / name, new / name)
                if os.path.lexists(old / name):
                    os.replace(old / name, out / name)
        except OSError as undo:
            raise _Stuck(f"replacing the files in {out} failed ({exc!r}) and putting the old "
                         f"ones back failed too ({undo}); help: the previous files are in "
                         f"{old}: move them back into {out} before provisioning here again "
                         "(the next provision removes that folder)") from exc
        raise
    fsync_dir(out)


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold an exclusive flock on OUT/.provision.lock, or fail at once if another provision
    does. The file is removed on the way out, while still locked: a provision that opened it
    just before finds another file (or none) at the path once it has the lock, and starts
    again on that one, so two never both hold it. A killed holder's lock ends with it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no flock, nothing stops two provisions at once
        yield
        return
    path = out / LOCK_FILE
    for _ in range(10):
        # O_NOFOLLOW: a symlink there is refused (ELOOP), never followed out of OUT
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            try:
                if os.path.samestat(os.fstat(fd), os.lstat(path)):
                    break
            except FileNotFoundError:
                pass
        except BlockingIOError as exc:
            os.close(fd)
            raise _Busy(f"another `heron devices provision` is writing {out} (it holds "
                        f"{path}); help: wait for it to finish and run this again, or pick "
                        "another --out") from exc
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # its holder removed it as we opened it: lock the one there now
    else:
        raise ProvisionError(f"could not lock {path}: it kept being replaced; help: run this "
                             "again once no other `heron devices provision` writes there")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


def _remove_leftovers(out: Path) -> list[str]:
    """Remove the staging folders a killed provision left in OUT; notes saying what was done.

    Called with the lock held, so no provision is using them. Only real folders are removed
    (rmtree does not follow symlinks inside them); a symlink or file by that name is left."""
    removed, notes = [], []
    for entry in sorted(os.scandir(out), key=lambda e: e.name):
        if not entry.name.startswith(STAGE_PREFIX):
            continue
        if not entry.is_dir(follow_symlinks=False):
            notes.append(f"left {entry.path} alone: it is named like a staging folder of "
                         "`heron devices provision` but is not a folder (a symlink or a file)")
            continue
        try:
            shutil.rmtree(entry.path)
        except OSError as exc:
            notes.append(f"could not remove {entry.path}, left by a provision that was killed "
                         f"(it holds credentials): {exc}; help: rm -rf {entry.path}")
        else:
            removed.append(entry.name)
    if removed:
        notes.insert(0, f"removed {', '.join(removed)} from {out}: left by a `heron devices "
                        "provision` that was killed, it held replaced or never-used credentials "
                        "(secrets)")
    return notes


def _remove_empty(made: list[Path]) -> None:
    """Remove the folders provisioning made (deepest first), as long as they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break


def summary(p: Provisioned, shards: str = "shards") -> str:
    """What was written and the commands that use it."""
    import shlex

    def args(name: str) -> str:
        obj = json.loads(p.credentials[name].read_text())
        flags = [f"--credentials {shlex.quote(str(p.credentials[name]))}"]
        flags += [f"--{key.replace('_', '-')} {shlex.quote(obj[key])}"
                  for key in ("ca_file", "cert_file", "key_file") if key in obj]
        if p.prefix != topics.DEFAULT_PREFIX:
            flags.append(f"--prefix {shlex.quote(p.prefix)}")
        return " ".join(flags)

    devices = [name for name in p.credentials if name != SERVER_CREDENTIALS]
    plural = "s" if len(devices) != 1 else ""
    lines = [f"provisioned {len(devices)} device{plural} and the server for {p.broker_url} "
             f"(prefix {p.prefix!r}) in {p.out}:",
             f"  {p.out / 'credentials'}/  one login per device, and server.json (mode 600)",
             f"  {p.out / 'passwd'}, {p.out / 'acl'}, {p.conf}"]
    if p.ca_file is not None:
        lines.append(f"  {p.ca_file.parent}/  the fleet CA and the broker's certificate")
    lines += [f"note: {n}" for n in p.notes]
    lines += ["start the broker, the server and each device with:",
              f"  mosquitto -c {shlex.quote(str(p.conf))}",
              f"  heron server --broker {p.broker_url} {args(SERVER_CREDENTIALS)} "
              f"--devices {len(devices)} --out run/"]
    for dev in devices[:3]:
        lines.append(f"  heron device --broker {p.broker_url} {args(dev)} --id {dev} "
                     f"--data {shards}/{dev}.npz")
    if len(devices) > 3:
        lines.append(f"  … and likewise for the other {len(devices) - 3} devices")
    lines.append("copy to each device only its own credentials file (and the CA certificate)")
    return "\n".join(lines)
