"""A broker provisioned by `heron devices provision` keeps strangers out and devices in their lane.

Every test runs a real Mosquitto with the generated config as is, and raw paho clients. Each
negative check is paired with an allowed message sent after the forbidden one on the same
connection: once the allowed one has arrived the forbidden one would have too, so a check
cannot pass because nothing worked at all.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from conftest import ROOT, free_port, heron, mosquitto_binary, wait_port
from paho.mqtt.enums import CallbackAPIVersion

from devices.provision import ProvisionOptions, provision
from edge_runtime.protocol import topics

pytestmark = pytest.mark.broker

WAIT = 5.0  # seconds for anything that should happen
GRACE = 0.3  # extra wait after the allowed sentinel before concluding "not delivered"


@dataclass
class Broker:
    dir: Path
    port: int
    proc: subprocess.Popen
    log: Path

    def creds(self, name: str) -> dict:
        return json.loads((self.dir / "credentials" / f"{name}.json").read_text())


def _openssl_or_skip() -> None:
    if shutil.which("openssl") is None:
        if os.environ.get("CI"):
            pytest.fail("openssl is not installed")
        pytest.skip("openssl is not installed")


def start_broker(out: Path, devices: tuple[str, ...] = ("dev-0", "dev-1"),
                 **kw: object) -> Broker:
    binary = mosquitto_binary()
    if kw.get("tls"):
        _openssl_or_skip()
    port = free_port()
    provision(ProvisionOptions(out=out, device_ids=devices, port=port, **kw))
    log = out / "mosquitto.log"
    proc = subprocess.Popen([binary, "-c", str(out / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"mosquitto did not start: {log.read_text()[-2000:]}") from None
    return Broker(out, port, proc, log)


def stop_broker(broker: Broker) -> None:
    broker.proc.terminate()
    try:
        broker.proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        broker.proc.kill()
        broker.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("plain") / "broker")
    yield b
    stop_broker(b)


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("tls") / "broker", tls=True)
    yield b
    stop_broker(b)


class Probe:
    """A bare paho client: records CONNACK, disconnects and every message it receives."""

    def __init__(self, port: int, cred: dict | None = None, *, password: str | None = None,
                 host: str = "127.0.0.1", tls: bool = False, ca_file: str | None = None,
                 cert: tuple[str, str] | None = None, client_id: str = "",
                 will: str | None = None) -> None:
        self.host, self.port = host, port
        self.client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2,
                                  client_id=client_id, protocol=mqtt.MQTTv311)
        if cred is not None:
            self.client.username_pw_set(cred["username"], password or cred["password"])
        if tls:
            self.client.tls_set(ca_certs=ca_file, certfile=cert and cert[0],
                                keyfile=cert and cert[1], cert_reqs=ssl.CERT_REQUIRED)
        if will is not None:
            self.client.will_set(will, b"offline", qos=1, retain=False)
        self.connack: queue.Queue[str] = queue.Queue()
        self.subacks: queue.Queue[int] = queue.Queue()
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.seen: list[tuple[str, bytes]] = []
        self.dropped = threading.Event()
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(str(rc))
        self.client.on_disconnect = lambda c, u, f, rc, p: self.dropped.set()
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.put(mid)
        self.client.on_message = lambda c, u, m: self.messages.put((m.topic, bytes(m.payload)))

    def connect(self) -> str:
        """'Success', the broker's refusal, or 'error: ...' when TLS or TCP failed."""
        try:
            self.client.connect(self.host, self.port, keepalive=10)
        except (OSError, ssl.SSLError) as exc:
            return f"error: {exc}"
        self.client.loop_start()
        answer, deadline = "no answer", time.monotonic() + WAIT
        while time.monotonic() < deadline:
            try:
                answer = self.connack.get(timeout=0.05)
                break
            except queue.Empty:
                if self.dropped.is_set():  # closed before any CONNACK, e.g. a TLS failure
                    answer = "dropped"
                    break
        if answer != "Success":
            self.close()  # stop paho from retrying
        return answer

    def subscribe(self, *filters: str) -> None:
        _, mid = self.client.subscribe([(f, 1) for f in filters])
        deadline = time.monotonic() + WAIT
        while self.subacks.get(timeout=WAIT) != mid:
            assert time.monotonic() < deadline, "no SUBACK"

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(WAIT)
        assert info.is_published(), f"no PUBACK for {topic}"

    def wait_for(self, topic: str) -> bytes:
        """Block until a message on `topic` arrives, keeping everything received on the way."""
        deadline = time.monotonic() + WAIT
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"nothing arrived on {topic}; got {[t for t, _ in self.seen]}"
            try:
                item = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            self.seen.append(item)
            if item[0] == topic:
                return item[1]

    def settle(self) -> list[str]:
        """Topics received so far, after a short grace for stragglers."""
        time.sleep(GRACE)
        while not self.messages.empty():
            self.seen.append(self.messages.get())
        return [t for t, _ in self.seen]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def probes() -> Iterator[list[Probe]]:
    made: list[Probe] = []
    yield made
    for p in made:
        p.close()


def _connected(made: list[Probe], broker: Broker, name: str, **kw: object) -> Probe:
    p = Probe(broker.port, broker.creds(name), **kw)
    made.append(p)
    assert p.connect() == "Success"
    return p


# -- who may connect ---------------------------------------------------------------------------
def test_anonymous_client_is_refused(broker: Broker) -> None:
    assert Probe(broker.port).connect() == "Not authorized"


def test_wrong_password_and_unknown_user_are_refused(broker: Broker,
                                                     probes: list[Probe]) -> None:
    assert Probe(broker.port, broker.creds("dev-0"), password="guess").connect() == \
        "Not authorized"
    stranger = {"username": "dev-9", "password": broker.creds("dev-0")["password"]}
    assert Probe(broker.port, stranger).connect() == "Not authorized"
    _connected(probes, broker, "dev-0")  # the right password is let in


def test_only_the_provisioned_listener_is_opened(broker: Broker) -> None:
    opened = [line for line in broker.log.read_text().splitlines() if "listen socket" in line]
    assert opened == [line for line in opened if f"port {broker.port}." in line]
    assert len(opened) == 1, opened  # loopback only, no stray default listener on 1883


# -- what each login may do ----------------------------------------------------------------------
def test_allowed_paths_work(broker: Broker, probes: list[Probe]) -> None:
    """Everything the protocol needs passes, so the refusals below are not vacuous."""
    server = _connected(probes, broker, "server")
    server.subscribe(*topics.server_subscriptions())
    dev = _connected(probes, broker, "dev-0", will=topics.device_status("dev-0"))
    dev.subscribe(*topics.device_subscriptions("dev-0"))
    for kind in topics.UP_KINDS:
        dev.publish(topics.up("dev-0", kind), kind.encode())
        assert server.wait_for(topics.up("dev-0", kind)) == kind.encode()
    dev.publish(topics.device_status("dev-0"), b"online", retain=True)
    assert server.wait_for(topics.device_status("dev-0")) == b"online"
    downs = [topics.server_status(), topics.down_device("dev-0", "bundle"),
             *(topics.down_all(k) for k in topics.DOWN_ALL_KINDS)]
    for topic in downs:
        server.publish(topic, b"x", retain=topic == topics.server_status())
        assert dev.wait_for(topic) == b"x"
    server.publish(topics.server_status(), b"", retain=True)  # clear for the other tests
    dev.publish(topics.device_status("dev-0"), b"", retain=True)


def test_device_cannot_publish_as_another_device(broker: Broker, probes: list[Probe]) -> None:
    server = _connected(probes, broker, "server")
    server.subscribe(f"{topics.DEFAULT_PREFIX}/#")
    a = _connected(probes, broker, "dev-0")
    for kind in topics.UP_KINDS:
        a.publish(topics.up("dev-1", kind), b"forged")
    a.publish(topics.device_status("dev-1"), b"offline", retain=True)
    a.publish(topics.up("dev-0", "update"), b"sentinel")
    server.wait_for(topics.up("dev-0", "update"))
    assert server.settle() == [topics.up("dev-0", "update")]


def test_device_cannot_publish_on_server_topics(broker: Broker, probes: list[Probe]) -> None:
    server = _connected(probes, broker, "server")
    server.subscribe(f"{topics.DEFAULT_PREFIX}/#")
    b = _connected(probes, broker, "dev-1")
    b.subscribe(*topics.device_subscriptions("dev-1"))
    a = _connected(probes, broker, "dev-0")
    a.publish(topics.server_status(), b"forged", retain=True)
    for kind in topics.DOWN_ALL_KINDS:
        a.publish(topics.down_all(kind), b"forged")
    a.publish(topics.down_device("dev-1", "bundle"), b"forged")
    a.publish(topics.up("dev-0", "join"), b"sentinel")
    server.wait_for(topics.up("dev-0", "join"))
    assert server.settle() == [topics.up("dev-0", "join")]
    assert b.settle() == []  # the other device saw no forged round, stop or bundle
    b.close()
    late = _connected(probes, broker, "dev-1")
    late.subscribe(topics.server_status())
    assert late.settle() == []  # and no forged retained server presence was stored


def test_device_cannot_read_another_devices_downlink(broker: Broker,
                                                     probes: list[Probe]) -> None:
    b = _connected(probes, broker, "dev-1")
    b.subscribe(*topics.device_subscriptions("dev-1"))
    a = _connected(probes, broker, "dev-0")
    a.subscribe(topics.down_device("dev-1", "bundle"), f"{topics.DEFAULT_PREFIX}/down/+/+",
                f"{topics.DEFAULT_PREFIX}/#", "#", *topics.device_subscriptions("dev-0"))
    server = _connected(probes, broker, "server")
    server.publish(topics.down_device("dev-1", "bundle"), b"dev-1's bundle")
    server.publish(topics.up("dev-1", "update"), b"dev-1's update")  # server may; a may not read
    server.publish(topics.down_all("round"), b"round")
    assert b.wait_for(topics.down_device("dev-1", "bundle")) == b"dev-1's bundle"  # B does
    a.wait_for(topics.down_all("round"))
    assert set(a.settle()) == {topics.down_all("round")}


def test_last_will_cannot_be_forged(broker: Broker, probes: list[Probe]) -> None:
    """A device's will on another's presence topic is dropped when it fires."""
    server = _connected(probes, broker, "server")
    server.subscribe(*topics.server_subscriptions())
    for will in (topics.device_status("dev-1"), topics.device_status("dev-0")):
        a = Probe(broker.port, broker.creds("dev-0"), will=will)
        assert a.connect() == "Success"
        a.client.loop_stop()
        a.client.socket().close()  # vanish without DISCONNECT: the broker sends the will
        time.sleep(0.1)
    server.wait_for(topics.device_status("dev-0"))
    assert server.settle() == [topics.device_status("dev-0")]


def test_device_cannot_take_over_another_devices_session(broker: Broker,
                                                         probes: list[Probe]) -> None:
    """The client id is the username, so A using B's client id cannot kick B off."""
    b = _connected(probes, broker, "dev-1", client_id="heron-dev-1")
    b.subscribe(*topics.device_subscriptions("dev-1"))
    for cid in ("heron-dev-1", "dev-1"):
        _connected(probes, broker, "dev-0", client_id=cid)
    server = _connected(probes, broker, "server")
    server.publish(topics.down_device("dev-1", "bundle"), b"still here")
    assert b.wait_for(topics.down_device("dev-1", "bundle")) == b"still here"
    assert not b.dropped.is_set()


# -- TLS ---------------------------------------------------------------------------------------
def test_tls_needs_the_fleet_ca(tls_broker: Broker, probes: list[Probe]) -> None:
    cred = tls_broker.creds("dev-0")
    assert cred["broker"] == f"mqtts://127.0.0.1:{tls_broker.port}"
    without_ca = Probe(tls_broker.port, cred, tls=True).connect()  # system CAs only
    assert without_ca.startswith("error:") and "CERTIFICATE_VERIFY_FAILED" in without_ca
    assert Probe(tls_broker.port, cred).connect() != "Success"  # plain MQTT on the TLS port
    for host in ("127.0.0.1", "localhost"):  # both names are in the certificate
        p = Probe(tls_broker.port, cred, host=host, tls=True, ca_file=cred["ca_file"])
        probes.append(p)
        assert p.connect() == "Success"
        p.close()
    refused = Probe(tls_broker.port, cred, password="guess", tls=True, ca_file=cred["ca_file"])
    assert refused.connect() == "Not authorized"  # TLS does not replace the password


def test_tls_with_client_certificates(tmp_path: Path, probes: list[Probe]) -> None:
    b = start_broker(tmp_path / "broker", tls=True, client_certs=True)
    try:
        cred = b.creds("dev-0")
        no_cert = Probe(b.port, cred, tls=True, ca_file=cred["ca_file"]).connect()
        assert no_cert != "Success"
        p = Probe(b.port, cred, tls=True, ca_file=cred["ca_file"],
                  cert=(cred["cert_file"], cred["key_file"]))
        probes.append(p)
        assert p.connect() == "Success"
    finally:
        stop_broker(b)


def test_forced_reprovision_swaps_in_working_logins(tmp_path: Path, probes: list[Probe]) -> None:
    """After `--force` the broker takes the new logins, whose files name their final paths
    (not the staging folder they were made in), and refuses the replaced ones."""
    _openssl_or_skip()
    out = tmp_path / "broker"
    provision(ProvisionOptions(out=out, device_ids=("dev-0",), tls=True))
    old = json.loads((out / "credentials" / "dev-0.json").read_text())
    b = start_broker(out, ("dev-0",), tls=True, force=True)
    try:
        cred = b.creds("dev-0")
        assert Path(cred["ca_file"]).parent == out.resolve() / "tls"
        p = Probe(b.port, cred, tls=True, ca_file=cred["ca_file"])
        probes.append(p)
        assert p.connect() == "Success"
        stale = Probe(b.port, cred, password=old["password"], tls=True, ca_file=cred["ca_file"])
        assert stale.connect() == "Not authorized"
    finally:
        stop_broker(b)


def test_broker_drops_root_and_still_reads_its_files(probes: list[Probe]) -> None:
    """As root, --broker-user mosquitto: the broker runs unprivileged and reads passwd/acl/key."""
    import pwd

    if os.geteuid() != 0:
        pytest.skip("needs root to hand files to another account")
    try:
        pwd.getpwnam("mosquitto")
    except KeyError:
        pytest.skip("no mosquitto account")
    _openssl_or_skip()
    top = Path(tempfile.mkdtemp(prefix="heron-sec-"))  # under /tmp, which others may enter
    try:
        top.chmod(0o755)
        b = start_broker(top / "broker", tls=True, broker_user="mosquitto")
        try:
            owner = subprocess.run(["ps", "-o", "user=", "-p", str(b.proc.pid)],
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            assert owner.startswith("mosquit"), owner  # ps may truncate the name
            cred = b.creds("server")
            p = Probe(b.port, cred, tls=True, ca_file=cred["ca_file"])
            probes.append(p)
            assert p.connect() == "Success"
        finally:
            stop_broker(b)
    finally:
        shutil.rmtree(top, ignore_errors=True)


# -- a whole federation through the locked-down broker ------------------------------------------
@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(heron("devices", "partition", "--dataset", "digits", "--devices", "2",
                         "--out", str(out)), cwd=ROOT, check=True, capture_output=True,
                   timeout=120)
    return out


def _federate(b: Broker, shards: Path, out: Path, server_extra: list[str]) -> dict:
    creds = b.dir / "credentials"
    url = b.creds("server")["broker"]
    server = subprocess.Popen(
        heron("server", "--broker", url, "--credentials", str(creds / "server.json"),
              *server_extra, "--out", str(out), "--devices", "2", "--rounds", "2",
              "--local-steps", "10", "--join-timeout", "90", "--round-timeout", "90"),
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    devs = [subprocess.Popen(heron("device", "--broker", url, "--credentials",
                                   str(creds / f"dev-{i}.json"), "--id", f"dev-{i}",
                                   "--data", str(shards / f"dev-{i}.npz"), "--threads", "1"),
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             text=True)
            for i in range(2)]
    try:
        _, stderr = server.communicate(timeout=240)
        logs = [d.communicate(timeout=60)[0] for d in devs]
    finally:
        for p in (server, *devs):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
    assert server.returncode == 0, stderr[-3000:]
    assert [d.returncode for d in devs] == [0, 0], [log[-1500:] for log in logs]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and "final_test_accuracy" in summary
    assert 0.0 <= summary["final_test_accuracy"] <= 1.0
    return summary


def test_federation_through_provisioned_broker(broker: Broker, shards: Path,
                                               tmp_path: Path) -> None:
    _federate(broker, shards, tmp_path / "run", [])


def test_federation_through_provisioned_broker_over_tls(tls_broker: Broker, shards: Path,
                                                        tmp_path: Path) -> None:
    """The server names the CA with --ca-file; the devices take it from their credentials."""
    ca = tls_broker.creds("server")["ca_file"]
    _federate(tls_broker, shards, tmp_path / "run", ["--ca-file", ca])


def test_device_with_wrong_password_stops_with_a_clear_error(broker: Broker, shards: Path,
                                                             tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**broker.creds("dev-0"), "password": "guess"}))
    proc = subprocess.run(heron("device", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                                "--credentials", str(bad), "--id", "dev-0",
                                "--data", str(shards / "dev-0.npz")),
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "refused" in proc.stderr and "Not authorized" in proc.stderr


def test_heron_run_with_provisioned_credentials(broker: Broker, tmp_path: Path) -> None:
    """`heron run --credentials-dir`: the server and every device log in as themselves."""
    out = tmp_path / "run"
    proc = subprocess.run(heron("run", "--broker", f"mqtt://127.0.0.1:{broker.port}",
                                "--credentials-dir", str(broker.dir / "credentials"),
                                "--devices", "2", "--rounds", "2", "--out", str(out)),
                          cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:] + proc.stdout[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert sorted(summary["devices"]) == ["dev-0", "dev-1"]
    assert "password" not in (out / "run.json").read_text()
