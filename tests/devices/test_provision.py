"""`heron devices provision` writes a Mosquitto-compatible password file, a least-privilege
ACL derived from the topics module, secret files nobody else can read, and a working TLS CA."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import ROOT, heron
from paho.mqtt.client import topic_matches_sub

from devices.mosquitto import (
    SERVER_USER,
    acl_text,
    check_mosquitto_hash,
    device_acl,
    mosquitto_hash,
)
from devices.provision import ProvisionError, ProvisionOptions, provision, summary
from edge_runtime.protocol import topics

# Written by the real `mosquitto_passwd -b passwd alice secret` (Mosquitto 2.0.11).
GOLDEN = ("$7$101$+JdwffOuIE46zNuo$M72REUtOjRWmCLIJt+o7G60CIoTfwi2YTSBNP3+RPBqYPRinkPm03sjEZKWaN"
          "JIVoncfvGZmkzD2i1hbQqQZgQ==")


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _provision(out: Path, *ids: str, **kw: object) -> object:
    return provision(ProvisionOptions(out=out, device_ids=ids or ("dev-0", "dev-1"), **kw))


# -- password hashes ---------------------------------------------------------------------------
def test_hash_matches_what_mosquitto_passwd_wrote() -> None:
    assert check_mosquitto_hash("secret", GOLDEN)
    assert not check_mosquitto_hash("Secret", GOLDEN)
    salt = __import__("base64").b64decode(GOLDEN.split("$")[3])
    assert mosquitto_hash("secret", salt=salt) == GOLDEN  # byte for byte


def test_hash_format_is_mosquitto_2_default() -> None:
    h = mosquitto_hash("pw")
    _, alg, iterations, salt, digest = h.split("$")
    assert (alg, iterations, len(salt), len(digest)) == ("7", "101", 16, 88)  # 12 + 64 bytes
    assert h != mosquitto_hash("pw")  # fresh salt every time
    assert check_mosquitto_hash("pw", h)


def test_hash_agrees_with_installed_mosquitto_passwd(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd is not installed")
    path = tmp_path / "pw"
    subprocess.run([tool, "-c", "-b", str(path), "dev-0", "s3cret/:$x"], check=True, timeout=30)
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "dev-0"
    assert check_mosquitto_hash("s3cret/:$x", hashed)
    assert not check_mosquitto_hash("s3cret", hashed)


# -- ACL -------------------------------------------------------------------------------------
def test_device_acl_allows_exactly_the_device_protocol() -> None:
    write, read = device_acl("dev-0")

    def allowed(patterns: list[str], topic: str) -> bool:
        return any(topic_matches_sub(p, topic) for p in patterns)

    for kind in topics.UP_KINDS:
        assert allowed(write, topics.up("dev-0", kind))
        assert not allowed(write, topics.up("dev-1", kind))
    assert allowed(write, topics.device_status("dev-0"))
    for topic in (topics.device_status("dev-1"), topics.server_status(),
                  *(topics.down_all(k) for k in topics.DOWN_ALL_KINDS),
                  topics.down_device("dev-0", "bundle")):
        assert not allowed(write, topic), topic
    # every filter the device subscribes to is readable as is
    assert set(topics.device_subscriptions("dev-0")) <= set(read)
    for topic in (topics.down_device("dev-0", "bundle"), topics.server_status(),
                  *(topics.down_all(k) for k in topics.DOWN_ALL_KINDS)):
        assert allowed(read, topic)
    for topic in (topics.down_device("dev-1", "bundle"), topics.up("dev-1", "update"),
                  topics.device_status("dev-1")):
        assert not allowed(read, topic), topic


def test_acl_text_sections() -> None:
    text = acl_text(["a", "b"], prefix="fleet/x")
    sections = {}
    for block in text.split("\n\n"):
        lines = [line for line in block.splitlines() if not line.startswith("#")]
        if lines and lines[0].startswith("user "):
            sections[lines[0][5:]] = lines[1:]
    assert sections[SERVER_USER] == ["topic readwrite fleet/x/#"]
    assert "topic write fleet/x/up/a/update" in sections["a"]
    assert "topic read fleet/x/down/a/+" in sections["a"]
    assert not any("/b" in line for line in sections["a"])
    assert not any(line.startswith("topic") for line in text.split("user ")[0].splitlines())


# -- files -----------------------------------------------------------------------------------
def test_provision_writes_private_files_that_agree(tmp_path: Path) -> None:
    out = tmp_path / "broker"
    result = _provision(out, "dev-0", "dev-1", port=18999)
    creds = {p.stem: json.loads(p.read_text()) for p in (out / "credentials").glob("*.json")}
    assert set(creds) == {"server", "dev-0", "dev-1"}
    assert creds["server"]["username"] == SERVER_USER
    assert creds["dev-1"]["username"] == "dev-1"
    assert {c["broker"] for c in creds.values()} == {"mqtt://127.0.0.1:18999"}
    assert {c["prefix"] for c in creds.values()} == {"heron"}
    assert len({c["password"] for c in creds.values()}) == 3
    assert all(len(c["password"]) >= 32 and "ca_file" not in c for c in creds.values())
    hashes = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    for c in creds.values():
        assert check_mosquitto_hash(c["password"], hashes[c["username"]])
    for path in [*(out / "credentials").iterdir(), out / "passwd", out / "acl"]:
        assert _mode(path) == 0o600, path
    assert _mode(out / "credentials") == 0o700
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert "allow_anonymous false" in conf and "per_listener_settings false" in conf
    assert f"password_file {out.resolve() / 'passwd'}" in conf
    assert f"acl_file {out.resolve() / 'acl'}" in conf
    assert "listener 18999 127.0.0.1" in conf
    # listener options after `listener`, or Mosquitto opens a stray default listener on 1883
    assert conf.index("use_username_as_clientid true") > conf.index("listener 18999 127.0.0.1")
    assert result.broker_url == "mqtt://127.0.0.1:18999"


def test_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    out = tmp_path / "b"
    _provision(out, "dev-0", "dev-1")
    old = json.loads((out / "credentials" / "dev-0.json").read_text())["password"]
    with pytest.raises(ProvisionError, match="--force"):
        _provision(out, "dev-0")
    _provision(out, "dev-0", force=True)
    assert json.loads((out / "credentials" / "dev-0.json").read_text())["password"] != old
    assert not (out / "credentials" / "dev-1.json").exists()  # no stale logins left behind
    assert "dev-1" not in (out / "passwd").read_text()


@pytest.mark.parametrize(("ids", "kw", "match"), [
    (("dev/0",), {}, "not allowed"),
    (("all",), {}, "not allowed"),
    (("+",), {}, "not allowed"),
    (("a", "a"), {}, "twice"),
    ((SERVER_USER,), {}, "reserved"),
    (("server",), {}, "reserved"),
    (("a",), {"prefix": "x/#"}, "prefix"),
    (("a",), {"prefix": "my fleet"}, "whitespace"),
    (("a",), {"client_certs": True}, "--tls"),
    (("a",), {"port": 70000}, "port"),
])
def test_bad_input_is_refused(tmp_path: Path, ids: tuple[str, ...], kw: dict,
                              match: str) -> None:
    with pytest.raises(ProvisionError, match=match):
        _provision(tmp_path / "b", *ids, **kw)
    assert not (tmp_path / "b").exists()


def test_broker_user_must_be_able_to_read_the_files(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        with pytest.raises(ProvisionError, match="needs root"):
            _provision(tmp_path / "b", broker_user="definitely-not-me")
        return
    with pytest.raises(ProvisionError, match="no such account"):
        _provision(tmp_path / "b", broker_user="no-such-user-heron")
    import pwd

    try:
        pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account")
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    with pytest.raises(ProvisionError, match="cannot enter"):
        _provision(private / "b", broker_user="nobody")
    private.chmod(0o755)
    tmp_path.chmod(0o755)
    reachable = all(p.stat().st_mode & stat.S_IXOTH for p in tmp_path.parents)
    if not reachable:
        return
    _provision(private / "b", broker_user="nobody")
    assert (private / "b" / "passwd").stat().st_uid == pwd.getpwnam("nobody").pw_uid
    assert (private / "b" / "credentials" / "server.json").stat().st_uid == 0
    assert "user nobody" in (private / "b" / "mosquitto.conf").read_text().splitlines()


def _openssl() -> str:
    path = shutil.which("openssl")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed")
        pytest.skip("openssl is not installed")
    return path


def test_tls_ca_and_broker_certificate(tmp_path: Path) -> None:
    openssl = _openssl()
    out = tmp_path / "b"
    result = _provision(out, "dev-0", tls=True, port=18998)
    tls = out / "tls"
    assert result.broker_url == "mqtts://127.0.0.1:18998"
    assert _mode(tls / "ca.key") == 0o600 and _mode(tls / "server.key") == 0o600
    assert json.loads((out / "credentials" / "dev-0.json").read_text())["ca_file"] == \
        str(tls.resolve() / "ca.crt")
    verify = subprocess.run([openssl, "verify", "-CAfile", str(tls / "ca.crt"),
                             str(tls / "server.crt")], capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run([openssl, "x509", "-in", str(tls / "server.crt"), "-noout", "-text"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert "IP Address:127.0.0.1" in text and "DNS:localhost" in text
    conf = (out / "mosquitto.conf").read_text().splitlines()
    assert f"cafile {tls.resolve() / 'ca.crt'}" in conf
    assert "require_certificate false" in conf
    assert not list(out.glob(".*"))  # the staging folder (csr, openssl.cnf) is gone


def test_tls_client_certificates(tmp_path: Path) -> None:
    openssl = _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", tls=True, client_certs=True)
    cred = json.loads((out / "credentials" / "dev-0.json").read_text())
    assert _mode(Path(cred["key_file"])) == 0o600
    text = subprocess.run([openssl, "x509", "-in", cred["cert_file"], "-noout", "-subject",
                           "-ext", "extendedKeyUsage"],
                          capture_output=True, text=True, check=True, timeout=30).stdout
    assert "CN = dev-0" in text and "Client Authentication" in text
    assert "require_certificate true" in (out / "mosquitto.conf").read_text()
    assert Path(json.loads((out / "credentials" / "server.json").read_text())["cert_file"]).exists()


# -- --force is all or nothing ------------------------------------------------------------------
def _snapshot(out: Path) -> dict[str, tuple[bytes | None, int, int, int]]:
    """Every entry under `out`: bytes (files), mode and owner; equal snapshots, same tree."""
    snap = {}
    for path in sorted(out.rglob("*")):
        st = path.lstat()
        body = path.read_bytes() if path.is_file() else None
        snap[str(path.relative_to(out))] = (body, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid)
    return snap


def _failing_openssl(folder: Path, real: str) -> str:
    """A folder for the front of PATH whose `openssl` runs the real one until its first `x509`
    (signing the broker's certificate): the CA and the server key are made, then it fails."""
    folder.mkdir()
    fake = folder / "openssl"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = x509 ]; then echo "fake openssl: disk on fire" >&2; '
                    f'exit 1; fi\nexec {real} "$@"\n')
    fake.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def test_force_failing_midway_leaves_the_old_credentials_untouched(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", "dev-1", tls=True, client_certs=True)
    before = _snapshot(out)
    monkeypatch.setenv("PATH", _failing_openssl(tmp_path / "bin", real))
    with pytest.raises(ProvisionError, match="previous credentials in .* are unchanged") as err:
        _provision(out, "dev-0", "dev-1", "dev-2", tls=True, client_certs=True, force=True)
    assert "fake openssl: disk on fire" in str(err.value)  # the cause is still named
    assert _snapshot(out) == before  # byte for byte, modes and owners, no staging folder left


def test_cli_force_failing_midway_says_the_old_credentials_are_unchanged(tmp_path: Path) -> None:
    real = _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", tls=True)
    before = _snapshot(out)
    env = {**os.environ, "PATH": _failing_openssl(tmp_path / "bin", real)}
    proc = subprocess.run(heron("devices", "provision", "--out", str(out), "--tls", "--force",
                                "dev-0"), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0
    assert f"the previous credentials in {out.resolve()} are unchanged" in proc.stderr
    assert _snapshot(out) == before


def test_cli_ctrl_c_says_the_old_credentials_are_unchanged(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import devices.tls
    from heron.cli import build_parser
    from heron.cli.fleet import cmd_provision

    _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", tls=True)
    before = _snapshot(out)

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(devices.tls, "make_tls", interrupted)
    args = build_parser().parse_args(["devices", "provision", "--out", str(out), "--tls",
                                      "--force", "dev-0"])
    assert cmd_provision(args) == 130
    assert f"interrupted; the previous credentials in {out.resolve()} are unchanged" in \
        capsys.readouterr().err
    assert _snapshot(out) == before


@pytest.mark.parametrize(("name", "after"), [
    ("credentials", False),  # the old credentials/ is set aside, the new one not yet in
    ("tls", True),  # credentials/ and tls/ swapped, then the interrupt
    ("mosquitto.conf", True),  # the very last rename done, its bookkeeping not
])
@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"),
                                   KeyboardInterrupt()], ids=["oserror", "ctrl-c"])
def test_force_failing_during_the_swap_puts_the_old_files_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, after: bool,
        error: BaseException) -> None:
    _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", "dev-1", tls=True)
    before = _snapshot(out)
    real_replace, fired = os.replace, []

    def replace(src: str | Path, dst: str | Path) -> None:
        """os.replace that fails once, as the staged `name` is moved into place."""
        hit = not fired and Path(dst) == out.resolve() / name and ".provision-" in str(src)
        if hit and after:
            real_replace(src, dst)
        if hit:
            fired.append(dst)
            raise error
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(ProvisionError if isinstance(error, OSError) else KeyboardInterrupt,
                       match="previous credentials in .* are unchanged"):
        _provision(out, "dev-0", "dev-1", tls=True, force=True)
    monkeypatch.undo()
    assert fired
    assert _snapshot(out) == before


def test_failure_on_a_fresh_out_leaves_nothing_behind(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = _openssl()
    monkeypatch.setenv("PATH", _failing_openssl(tmp_path / "bin", real))
    with pytest.raises(ProvisionError, match="nothing was left in"):
        _provision(tmp_path / "new" / "b", "dev-0", tls=True)
    assert not (tmp_path / "new").exists()  # not even the folders it made for --out


def test_force_replaces_every_secret_and_leaves_no_staging(tmp_path: Path) -> None:
    _openssl()
    out = tmp_path / "b"
    _provision(out, "dev-0", "dev-1", tls=True)
    old = {p.stem: json.loads(p.read_text()) for p in (out / "credentials").glob("*.json")}
    old_ca = (out / "tls" / "ca.crt").read_bytes()
    _provision(out, "dev-0", "dev-1", tls=True, force=True)
    assert sorted(p.name for p in out.iterdir()) == \
        ["acl", "credentials", "mosquitto.conf", "passwd", "tls"]  # no staging, no backup
    hashes = dict(line.split(":", 1) for line in (out / "passwd").read_text().splitlines())
    for name, cred in old.items():
        new = json.loads((out / "credentials" / f"{name}.json").read_text())
        assert new["password"] != cred["password"]
        assert not check_mosquitto_hash(cred["password"], hashes[cred["username"]])
        assert check_mosquitto_hash(new["password"], hashes[new["username"]])
        assert new["ca_file"] == str(out.resolve() / "tls" / "ca.crt")  # the final path
    assert (out / "tls" / "ca.crt").read_bytes() != old_ca
    assert _mode(out / "credentials") == 0o700
    for path in [*(out / "credentials").iterdir(), out / "passwd", out / "acl",
                 out / "tls" / "ca.key", out / "tls" / "server.key"]:
        assert _mode(path) == 0o600, path
    assert _mode(out / "mosquitto.conf") == 0o644
    _provision(out, "dev-0", force=True)  # without --tls now: the old CA goes too
    assert sorted(p.name for p in out.iterdir()) == \
        ["acl", "credentials", "mosquitto.conf", "passwd"]



# -- one provision at a time; what a killed one left --------------------------------------------
def test_what_a_killed_provision_left_is_removed_by_the_next(tmp_path: Path) -> None:
    out = tmp_path / "b"
    _provision(out, "dev-0")
    # SIGKILL after the swap: the staging folder holds the replaced secrets; the lock file stays
    left = out / ".provision-xyz"
    (left / "old" / "credentials").mkdir(parents=True, mode=0o700)
    (left / "old" / "credentials" / "dev-0.json").write_text('{"password": "old"}')
    (out / ".provision.lock").touch()
    (out / ".provisional").write_text("not ours")  # near the name, but not a staging folder
    result = _provision(out, "dev-0", force=True)
    assert not left.exists()
    assert any(".provision-xyz" in n and "killed" in n for n in result.notes)
    assert "note: removed .provision-xyz" in summary(result)
    assert sorted(p.name for p in out.iterdir()) == \
        [".provisional", "acl", "credentials", "mosquitto.conf", "passwd"]  # no lock file either


def test_a_provision_already_writing_out_makes_another_fail_at_once(tmp_path: Path) -> None:
    out = tmp_path / "b"
    _provision(out, "dev-0")
    fd = os.open(out / ".provision.lock", os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running provision holds it
        before = _snapshot(out)
        with pytest.raises(ProvisionError, match="another `heron devices provision` is writing"):
            _provision(out, "dev-0", force=True)
        assert _snapshot(out) == before  # the lock file and every credential untouched
    finally:
        os.close(fd)
    _provision(out, "dev-0", force=True)  # once it is released
    assert not (out / ".provision.lock").exists()


def test_symlinks_named_like_its_files_are_not_followed(tmp_path: Path) -> None:
    out, outside = tmp_path / "b", tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("not provision's")
    _provision(out, "dev-0")
    (out / ".provision-evil").symlink_to(outside, target_is_directory=True)
    result = _provision(out, "dev-0", force=True)
    assert (outside / "keep").read_text() == "not provision's"
    assert (out / ".provision-evil").is_symlink()  # left alone, and said so
    assert any(".provision-evil alone" in n for n in result.notes)
    (out / ".provision.lock").symlink_to(outside / "made")
    with pytest.raises(ProvisionError, match="provision.lock"):
        _provision(out, "dev-0", force=True)
    assert sorted(p.name for p in outside.iterdir()) == ["keep"]

def test_cli_prints_the_commands(tmp_path: Path) -> None:
    out = tmp_path / "b"
    proc = subprocess.run(heron("devices", "provision", "--out", str(out), "--port", "18997",
                                "--prefix", "lab", "dev-0", "dev-1"),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"mosquitto -c {out.resolve() / 'mosquitto.conf'}" in proc.stdout
    assert "heron server --broker mqtt://127.0.0.1:18997 --credentials" in proc.stdout
    assert "--id dev-1" in proc.stdout and "--prefix lab" in proc.stdout
    again = subprocess.run(heron("devices", "provision", "--out", str(out), "dev-0"),
                           cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert again.returncode != 0
    assert "already exists; help: pass --force" in again.stderr


def test_cli_credentials_file_supplies_tls_files(tmp_path: Path) -> None:
    from heron.cli import build_parser
    from heron.cli.options import mqtt_credentials

    cred = tmp_path / "c.json"
    cred.write_text(json.dumps({"username": "u", "password": "p", "ca_file": "/ca.crt",
                                "cert_file": "/c.crt", "key_file": "/c.key"}))
    base = ["device", "--broker", "mqtts://h", "--id", "d", "--data", "x.npz"]
    args = build_parser().parse_args([*base, "--credentials", str(cred)])
    c = mqtt_credentials(args)
    assert (c.username, c.password, c.ca_file, c.cert_file, c.key_file) == \
        ("u", "p", "/ca.crt", "/c.crt", "/c.key")
    args = build_parser().parse_args([*base, "--credentials", str(cred), "--ca-file", "/o.crt"])
    assert mqtt_credentials(args).ca_file == "/o.crt"  # the option wins
