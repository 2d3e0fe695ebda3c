"""Insiders: provisioned devices gone bad attack a running federation of honest devices.

Each insider logs in to a provisioned Mosquitto over TLS with its own credentials and
publishes crafted bytes with raw paho publishes on its own topics only, which the ACL
allows (tests/test_security.py shows it allows nothing else). Every attack has its own
insider and its own round of one run; the honest devices' updates must all be applied in
every round, the model must end within a point of the same run without the insiders, the
server must exit 0 and every attack must be counted in summary.json `rejected`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, free_port, heron, mosquitto_binary, wait_port

from devices.provision import ProvisionOptions, provision
from edge_runtime.protocol import (
    MAX_CHUNK_PAYLOAD,
    MAX_MESSAGE_BYTES,
    DeviceError,
    Join,
    Message,
    Presence,
    RoundStart,
    Smashed,
    Stop,
    TrainConfig,
    Update,
    chunk,
    encode,
    new_msg_id,
    topics,
)
from edge_runtime.transport import Credentials, MqttTransport

pytestmark = [pytest.mark.broker, pytest.mark.slow]

HONEST = ("dev-0", "dev-1", "dev-2")
ROUNDS = 20  # attacks in rounds 2..10, then ten clean rounds whose accuracy is compared
SETTLED = range(11, ROUNDS + 1)
# --deterministic: the server trains a round's uploads in (step, device) order, so two runs
# differ only by what the insiders got in, not by the order the OS delivered uploads in
FEDERATION = ["--devices", "3", "--rounds", str(ROUNDS), "--seed", "0", "--round-timeout", "60",
              "--join-timeout", "120", "--deterministic"]
CHUNK_HEAD = struct.Struct("<4s16sIIQ")  # the wire's chunk header: magic, id, index, count, total
DECLARED = 100  # samples every insider declares when it joins


@dataclass
class Fleet:
    dir: Path
    port: int
    proc: subprocess.Popen

    def creds(self, name: str) -> dict:
        return json.loads((self.dir / "credentials" / f"{name}.json").read_text())


# -- the insiders ---------------------------------------------------------------------------
class Insider:
    """A provisioned device's login, used to publish whatever bytes it likes on its topics."""

    def __init__(self, fleet: Fleet, name: str) -> None:
        cred = fleet.creds(name)
        self.name = name
        self.t = MqttTransport(cred["broker"], name, topics.device_subscriptions(name),
                               credentials=Credentials(cred["username"], cred["password"],
                                                       cred["ca_file"]), persistent=False)
        self.hostile = 0  # messages sent that the server must refuse and count
        self.uncounted = 0  # of which the codec may drop before the loop sees them
        self.leaves = 0  # 'skipping' errors sent as a member

    def raw(self, kind: str, payload: bytes, *, hostile: bool = True) -> None:
        self.t._client.publish(topics.up(self.name, kind), payload, qos=1)
        self.hostile += hostile

    def send(self, msg: Message, kind: str | None = None, *, msg_id: str | None = None,
             hostile: bool = True) -> None:
        for part in chunk(encode(msg), msg_id or msg.msg_id):
            self.t._client.publish(topics.up(self.name, kind or msg.kind), part, qos=1)
        self.hostile += hostile

    def forge(self, kind: str, msg_id: str, payload: bytes) -> None:
        for part in chunk(payload, msg_id):
            self.t._client.publish(topics.up(self.name, kind), part, qos=1)
        self.hostile += 1

    def join(self, run: str, sha: str | None, hostile: bool = False) -> None:
        prof = {"samples": DECLARED, "algorithms": ["heron", "frozen"], "machine": "x86_64"}
        self.send(Join(run, -1, self.name, profile=prof, bundle_sha256=sha), hostile=hostile)

    def leave(self, start: RoundStart) -> None:
        """What an honest device does when it cannot train a round: say so, as a member."""
        self.send(DeviceError(start.run_id, start.round, self.name, error="skipping"),
                  hostile=False)
        self.leaves += 1


def frame(kind: str, s: RoundStart, sender: str, meta: dict, arrays: dict | None = None,
          msg_id: str | None = None) -> tuple[str, bytes]:
    """A message in the wire format built by hand, so that it can hold what the message
    classes refuse to build (NaN counts, hostile profiles): MAGIC | u32 | header | arrays."""
    table, blobs = [], []
    for name, arr in (arrays or {}).items():
        table.append({"name": name, "dtype": str(arr.dtype), "shape": list(arr.shape)})
        blobs.append(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<")).tobytes())
    mid = msg_id or new_msg_id()
    head = json.dumps({"v": 1, "kind": kind, "run_id": s.run_id, "round": s.round,
                       "msg_id": mid, "sender": sender, "meta": meta,
                       "arrays": table}).encode()  # NaN and Infinity as JSON extensions
    return mid, b"HRN1" + struct.pack("<I", len(head)) + head + b"".join(blobs)


def update_frame(s: RoundStart, who: str, *, weights: np.ndarray | None = None,
                 num_samples: object = DECLARED, telemetry: object = None) -> tuple[str, bytes]:
    return frame("update", s, who, {"num_samples": num_samples, "telemetry": telemetry or {}},
                 {"weights": s.weights.copy() if weights is None else weights})


def join_frame(s: RoundStart, who: str, **profile: object) -> tuple[str, bytes]:
    prof = {"samples": DECLARED, "algorithms": ["heron", "frozen"], **profile}
    return frame("join", s, who, {"profile": prof, "bundle_sha256": s.bundle_sha256})


def _smashed(s: RoundStart, who: str, shape: tuple[int, ...], batch: int = 2, *,
             step: int = 0, round_idx: int | None = None) -> Smashed:
    # coded as the run's devices code (an insider knows the round's config), so each
    # attack meets the check it is aimed at, not the codec's
    return Smashed.coded(s.run_id, s.round if round_idx is None else round_idx, who, step,
                         np.zeros((batch, *shape), np.float32),
                         np.arange(batch, dtype=np.int64) % 10,
                         TrainConfig.from_json(s.config).smashed_codec)


def _huge_chunks(total: int) -> list[bytes]:
    """Chunk headers that declare a message of `total` bytes: the last chunk of two (a few
    bytes on the wire) and the first full chunk of the many it would take."""
    tiny = CHUNK_HEAD.pack(b"HRC1", os.urandom(16), 1, 2, total) + b"\0" * 10
    per = MAX_CHUNK_PAYLOAD - CHUNK_HEAD.size
    first = CHUNK_HEAD.pack(b"HRC1", os.urandom(16), 0, math.ceil(total / per), total) + \
        b"\0" * per
    return [tiny, first]


def attack_bad_updates(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(b) sample counts that are not a finite count up to the declared one; bad weights."""
    for n in (float("nan"), float("inf"), 1e30, -5, DECLARED * 10_000):
        i.forge("update", *update_frame(s, i.name, num_samples=n))
    i.forge("update", *update_frame(s, i.name, weights=np.full_like(s.weights, np.nan)))
    i.forge("update", *update_frame(s, i.name, weights=np.full_like(s.weights, 1e30)))


def attack_telemetry(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(c) telemetry with fields missing and of the wrong types."""
    i.forge("update", *update_frame(s, i.name, telemetry={"peak_rss_mb": 70.0}))
    i.forge("update", *update_frame(s, i.name, telemetry={
        "peak_rss_mb": "lots", "step_ms_median": [1], "step_ms_mean": None, "round_s": {},
        "loss_first": 1.0, "loss_last": 1.0, "loss_mean": "x", "steps": 1.5,
        "smashed_sent": -1, "bytes_in": 0, "bytes_out": 0}))
    i.forge("update", *update_frame(s, i.name, telemetry=[1, 2, 3]))


def attack_smashed(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(f) batches larger than the round's batch size, smashed data for other rounds."""
    i.send(_smashed(s, i.name, shape, batch=33))
    i.send(_smashed(s, i.name, shape, batch=1000))  # 1 MB under int8: more than one chunk
    i.send(_smashed(s, i.name, shape, round_idx=s.round + 1))
    i.send(_smashed(s, i.name, shape, round_idx=s.round - 1))


def attack_spoofing(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(g) other senders and kinds than the topic says, a replayed message id, and joins with
    hostile profiles."""
    i.send(Update(s.run_id, s.round, "dev-0", weights=s.weights.copy(), num_samples=DECLARED))
    i.send(Presence(s.run_id, -1, "dev-0", state="offline"), "update")
    i.t._client.publish(topics.device_status(i.name),
                        chunk(encode(Presence("", -1, "dev-0", state="offline")),
                              new_msg_id())[0], qos=1)
    i.hostile += 1
    i.send(_smashed(s, i.name, shape), "update")  # a smashed batch on the update topic
    replayed = _smashed(s, i.name, shape, step=1)  # step 1: never an upload step
    i.send(replayed)
    i.send(replayed)  # the same message id again: applied (here: refused) once, and the
    # replay counted as a duplicate message
    for profile in ({"samples": 1e30}, {"samples": 10**12}, {"samples": "many"},
                    {"machine": "x" * 200_000}, {"samples": 0}, {"samples": 5 * 10**8},
                    {"algorithms": ["heron"] * 1000}, {"samples": DECLARED, "evil": 1}):
        i.forge("join", *join_frame(s, i.name, **profile))


def attack_error_flood(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(e) a member floods error messages."""
    for k in range(60):
        i.send(DeviceError(s.run_id, s.round, i.name, error=f"flood {k} " + "E" * 4000))


def attack_join_flood(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(d) repeated joins with a wrong bundle hash: each used to cost a whole bundle."""
    for _ in range(40):
        i.join(s.run_id, "0" * 64, hostile=True)
    i.uncounted += 3  # the bundle's burst is served, as to a device that lost its bundle


def attack_smashed_flood(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(f) a flood of well-formed smashed uploads for the current round."""
    for _ in range(150):
        i.send(_smashed(s, i.name, shape))
    i.uncounted += 1  # the first is trained on, as any member's upload for step 0


def attack_outsider(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(e, a) a device that never joined: an error flood, and chunks declaring a huge
    message on its join topic."""
    for _ in range(30):
        i.send(DeviceError(s.run_id, s.round, i.name, error="not a member " + "N" * 4000))
    for c in _huge_chunks(MAX_MESSAGE_BYTES):
        i.raw("join", c)


def attack_huge_chunk(i: Insider, s: RoundStart, shape: tuple[int, ...]) -> None:
    """(a) a member declares huge updates while the honest devices are about to send theirs:
    over the update limit (refused at the first chunk), and at it (held against the
    sender's own budget, counted against it when it expires or, at the latest, when the run
    ends)."""
    for c in _huge_chunks(MAX_MESSAGE_BYTES):
        i.raw("update", c)
    for c in _huge_chunks(Update.max_bytes):
        i.raw("update", c)


Attack = Callable[[Insider, RoundStart, tuple[int, ...]], None]
# round -> (insider, attack); an insider that is not "mal-out" joins in round 1
SCHEDULE: dict[int, tuple[str, Attack]] = {
    2: ("mal-upd", attack_bad_updates),
    3: ("mal-tel", attack_telemetry),
    4: ("mal-sm", attack_smashed),
    5: ("mal-spoof", attack_spoofing),
    6: ("mal-err", attack_error_flood),
    7: ("mal-join", attack_join_flood),
    8: ("mal-flood", attack_smashed_flood),
    9: ("mal-out", attack_outsider),
    10: ("mal-big", attack_huge_chunk),
}
INSIDERS = tuple(name for name, _ in SCHEDULE.values())
MEMBERS = tuple(n for n in INSIDERS if n != "mal-out")
FLOODERS = ("mal-err", "mal-join", "mal-flood", "mal-out")  # must end up quarantined


@dataclass
class Campaign:
    """Drives the insiders: joins in round 1, one attack per scheduled round, and a member's
    'skipping' error in every round it is picked for (as an honest device that cannot train
    would), so that no round waits for an insider."""

    fleet: Fleet
    out: Path
    insiders: dict[str, Insider] = field(default_factory=dict)
    done: dict[int, str] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.insiders = {n: Insider(self.fleet, n) for n in INSIDERS}
        for i in self.insiders.values():
            i.t.start()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _shape(self) -> tuple[int, ...]:
        manifest = json.loads((self.out / "bundle" / "manifest.json").read_text())
        return tuple(manifest["outputs"]["smashed"]["shape"][1:])

    def _run(self) -> None:
        try:
            watch = self.insiders[INSIDERS[0]].t
            while not self.stop.is_set():
                inc = watch.get(0.2)
                msg = inc.message if inc is not None else None
                if isinstance(msg, Stop):
                    return
                if isinstance(msg, RoundStart) and msg.round not in self.done:
                    self._round(msg)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(repr(exc))

    def _round(self, s: RoundStart) -> None:
        if s.round == 1:
            for name in MEMBERS:
                self.insiders[name].join(s.run_id, s.bundle_sha256)
        planned = SCHEDULE.get(s.round)
        if planned is not None:
            name, attack = planned
            attack(self.insiders[name], s, self._shape())
        self.done[s.round] = planned[0] if planned else ""
        for name in MEMBERS:
            if name in s.participants:
                self.insiders[name].leave(s)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for i in self.insiders.values():
            i.t.stop()


# -- the federations ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    out = tmp_path_factory.mktemp("attacks") / "broker"
    port = free_port()
    provision(ProvisionOptions(out=out, device_ids=(*HONEST, *INSIDERS), port=port, tls=True))
    log = out / "mosquitto.log"
    proc = subprocess.Popen([mosquitto_binary(), "-c", str(out / "mosquitto.conf")],
                            stdout=subprocess.DEVNULL, stderr=log.open("w"))
    try:
        wait_port(port)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"mosquitto did not start: {log.read_text()[-2000:]}") from None
    yield Fleet(out, port, proc)
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    subprocess.run(heron("devices", "partition", "--devices", "3", "--seed", "0", "--out",
                         str(out)), cwd=ROOT, check=True, capture_output=True, timeout=120)
    return out


@dataclass
class Run:
    summary: dict
    records: list[dict]
    log: str
    out: Path
    campaign: Campaign | None


def federate(fleet: Fleet, shards: Path, out: Path, attack: bool) -> Run:
    creds = fleet.dir / "credentials"
    url = fleet.creds("server")["broker"]
    out.mkdir(parents=True)
    campaign = Campaign(fleet, out) if attack else None
    server_log = (out / "server.log").open("w")
    server = subprocess.Popen(
        heron("server", "--broker", url, "--credentials", str(creds / "server.json"),
              "--ca-file", fleet.creds("server")["ca_file"], "--out", str(out), *FEDERATION),
        cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT)
    devs = [subprocess.Popen(heron("device", "--broker", url, "--credentials",
                                   str(creds / f"{d}.json"), "--id", d, "--data",
                                   str(shards / f"{d}.npz"), "--threads", "1"),
                             cwd=ROOT, stdout=(out / f"{d}.log").open("w"),
                             stderr=subprocess.STDOUT)
            for d in HONEST]
    try:
        server.wait(timeout=600)
        codes = [d.wait(timeout=60) for d in devs]
    finally:
        for p in (server, *devs):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        if campaign is not None:
            campaign.close()
    log = (out / "server.log").read_text()
    assert server.returncode == 0, log[-4000:]
    assert codes == [0, 0, 0], [(out / f"{d}.log").read_text()[-1500:] for d in HONEST]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(json.loads((out / "summary.json").read_text()), records, log, out, campaign)


@pytest.fixture(scope="module")
def baseline(fleet: Fleet, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Run:
    return federate(fleet, shards, tmp_path_factory.mktemp("baseline") / "run", attack=False)


@pytest.fixture(scope="module")
def attacked(fleet: Fleet, shards: Path, tmp_path_factory: pytest.TempPathFactory,
             baseline: Run) -> Run:
    run = federate(fleet, shards, tmp_path_factory.mktemp("attacked") / "run", attack=True)
    assert run.campaign is not None and not run.campaign.errors, run.campaign.errors
    assert {r: n for r, n in run.campaign.done.items() if n} == \
        {r: name for r, (name, _) in SCHEDULE.items()}, "an attack was not made"
    return run


# -- what must hold ---------------------------------------------------------------------------
def test_the_baseline_learns_and_rejects_nothing(baseline: Run) -> None:
    assert baseline.summary["final_test_accuracy"] > 0.9
    assert baseline.summary["rejected"] == {} and baseline.summary["quarantined"] == {}


def test_every_honest_update_is_applied_and_no_insiders(attacked: Run) -> None:
    assert len(attacked.records) == ROUNDS
    for rec in attacked.records:
        assert rec["updates"] == list(HONEST), (rec["round"], rec["updates"], rec["dropped"])
        assert rec["round_seconds"] < 30, rec  # no round waited for its deadline (60 s)


def test_accuracy_is_within_a_point_of_the_run_without_insiders(attacked: Run,
                                                                baseline: Run) -> None:
    """Compared over the ten clean rounds after the last attack. Both runs are
    --deterministic, so without insiders they would be identical (BENCHMARKS.md,
    `--deterministic`): the difference is what the insiders' accepted messages did to the
    model, not delivery order. (Trained in arrival order, an attacked and a clean run
    differed by -1.3 to +1.1 points over these rounds in 19 tries on one machine, so a
    1-point check on them failed now and then.)"""
    got, want = (np.mean([r["test_accuracy"] for r in run.records if r["round"] in SETTLED])
                 for run in (attacked, baseline))
    assert abs(got - want) <= 0.01, (got, want, attacked.summary["test_accuracy_per_round"],
                                     baseline.summary["test_accuracy_per_round"])
    ckpt = torch.load(attacked.out / "checkpoint.pt", weights_only=True)
    assert torch.isfinite(ckpt["device_weights"]).all()


def test_every_attack_is_counted(attacked: Run) -> None:
    s = attacked.summary
    by_device = s["rejected_by_device"]
    assert set(by_device) <= set(INSIDERS), by_device  # no honest device was ever refused
    assert attacked.campaign is not None
    for name, i in attacked.campaign.insiders.items():
        # each message sent is refused, dropped in quarantine, or taken as a member's error
        # (its 'skipping' errors, and the first of a flood, up to the rate's burst)
        counted = sum(by_device.get(name, {}).values()) + \
            s["quarantine_dropped"].get(name, 0) + s["device_errors"].get(name, 0)
        assert counted >= i.hostile + i.leaves - i.uncounted, \
            (name, i.hostile, i.leaves, counted, by_device.get(name))
        assert s["device_errors"].get(name, 0) <= i.leaves + 5  # the error rate's burst


def test_each_attack_is_refused_for_its_reason(attacked: Run) -> None:
    by = attacked.summary["rejected_by_device"]
    assert by["mal-sm"].get("future round") == 1 and by["mal-sm"].get("stale round") == 1
    assert by["mal-spoof"].get("spoofed sender", 0) >= 4
    assert by["mal-err"].get("rate limited", 0) >= 1
    assert by["mal-join"].get("bundle resend refused", 0) >= 1
    assert by["mal-flood"].get("too many smashed", 0) >= 1
    assert by["mal-out"].get("error from non-member", 0) >= 1
    for name in ("mal-upd", "mal-tel", "mal-sm"):
        assert sum(by[name].values()) >= attacked.campaign.insiders[name].hostile  # type: ignore[union-attr]


def test_flooders_are_quarantined_and_shown(attacked: Run) -> None:
    s = attacked.summary
    assert set(FLOODERS) <= set(s["quarantined"]) <= set(INSIDERS), s["quarantined"]
    assert attacked.records[-1]["quarantined"] == s["quarantined"]
    for name in FLOODERS:
        assert attacked.log.count(f"QUARANTINED device {name} ") == 1
    late = [r for r in attacked.records if r["round"] > 9]
    assert not any(set(FLOODERS) & set(r["participants"]) for r in late)


def test_bundle_is_not_resent_for_every_wrong_join(attacked: Run) -> None:
    """40 joins with a wrong hash: the bundle goes out at most its burst of 3 times."""
    sends = sum(1 for line in attacked.log.splitlines()
                if "sent bundle" in line and line.rstrip().endswith(" to mal-join"))
    assert 1 <= sends <= 3, sends


def test_logs_and_records_stay_small(attacked: Run) -> None:
    """Floods are counted, not logged line by line; hostile texts do not grow the files."""
    assert len(attacked.log) < 200_000, len(attacked.log)
    assert "E" * 600 not in attacked.log and "N" * 200 not in attacked.log
    assert (attacked.out / "summary.json").stat().st_size < 100_000
