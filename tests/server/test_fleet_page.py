"""The live fleet page without a browser: the state the loop keeps (`FleetView`, fed the way
`server.loop.Server` feeds it, through a real `Members`), and the aiohttp app over a real
socket: `/api/state`, the bearer token, server-sent events, the static assets."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_runtime.algorithms import algorithm
from edge_runtime.protocol import Presence, TrainConfig, topics
from edge_runtime.transport import Incoming
from heron.cli import main
from server.fleet_page import FleetPage
from server.fleet_view import MAX_DEVICES, FleetObserver, FleetView, fleet_observer, split_address
from server.members import Members
from server.options import ServerOptions
from server.policy import Limits

P = topics.DEFAULT_PREFIX
RUN = "run0000000001"


def _members() -> Members:
    return Members(Limits(), P, RUN, algorithm("heron"), "sha", send_bundle=lambda d: None,
                   leave_round=lambda d: None)


def _presence(view: FleetView, members: Members, dev: str, state: str) -> None:
    """A device's presence handled as the loop handles it: members first, then the view."""
    inc = Incoming(topics.device_status(dev, P), Presence(RUN, -1, dev, state=state), 120)
    members.admit(inc, None, 0)
    view.message(inc, members, None)


def _record(r: int) -> dict[str, Any]:
    return {"round": r, "test_accuracy": 0.5 + r / 10, "test_loss": 1.0 / r,
            "server_train_loss": 1.5, "device_local_loss": 2.0, "round_bytes_up": 1000 * r,
            "round_bytes_down": 2000, "round_seconds": 1.0, "participants": ["dev-1"],
            "updates": ["dev-1"], "device_peak_rss_mb": {"dev-1": 80.0},
            "device_step_ms": {"dev-1": 12.5}}


def test_the_view_follows_presence_rounds_and_records() -> None:
    view, members = FleetView(P), _members()
    view.started(RUN, ServerOptions(broker="x", out=None, rounds=3), [_record(1)])  # type: ignore[arg-type]
    _presence(view, members, "dev-1", "online")
    _presence(view, members, "dev-2", "online")
    snap = view.snapshot()
    assert [(d["id"], d["online"], d["bytes_up"]) for d in snap["devices"]] == \
        [("dev-1", True, 120), ("dev-2", True, 120)]
    assert [h["round"] for h in snap["history"]] == [1]  # a resumed run's earlier rounds
    view.round_started(2, ("dev-1", "dev-2"), 60.0)
    rnd = view.snapshot()["round"]
    assert rnd["participants"] == ["dev-1", "dev-2"] and rnd["reported"] == []
    assert 59 < rnd["deadline"] - rnd["started"] <= 60
    _presence(view, members, "dev-2", "offline")
    assert [d["online"] for d in view.snapshot()["devices"]] == [True, False]
    v = view.version
    view.round_done(_record(2), members)
    snap = view.snapshot()
    assert snap["version"] > v and snap["round"] is None
    assert [h["round"] for h in snap["history"]] == [1, 2]
    assert snap["history"][1]["updates"] == 1 and snap["history"][1]["round_bytes_up"] == 2000
    assert snap["devices"][0]["peak_rss_mb"] == 80.0
    assert snap["devices"][0]["step_ms_median"] == 12.5
    json.dumps(snap)  # JSON as it is


def test_rejections_and_spoofed_presence_reach_the_device_they_were_counted_on() -> None:
    view, members = FleetView(P), _members()
    # dev-3's status topic carrying dev-4's presence: rejected, dev-3 stays offline
    inc = Incoming(topics.device_status("dev-3", P), Presence(RUN, -1, "dev-4", state="online"),
                   50)
    members.admit(inc, None, 0)
    view.message(inc, members, None)
    (dev,) = view.snapshot()["devices"]
    assert (dev["id"], dev["online"], dev["rejected"]) == ("dev-3", False, 1)


def test_invented_ids_are_not_kept_past_the_bound() -> None:
    view, members = FleetView(P), _members()
    for i in range(MAX_DEVICES + 5):
        view.message(Incoming(topics.device_status(f"d{i}", P), None, 1, error="bad"), members,
                     None)
    assert len(view.snapshot()["devices"]) == MAX_DEVICES


def test_without_http_the_loop_gets_the_no_op_observer() -> None:
    plain = ServerOptions(broker="x", out=None)  # type: ignore[arg-type]
    assert type(fleet_observer(plain)) is FleetObserver
    assert isinstance(fleet_observer(ServerOptions(broker="x", out=None, http="0")),  # type: ignore[arg-type]
                      FleetView)


@pytest.mark.parametrize(("text", "want"), [
    ("8080", ("127.0.0.1", 8080)), ("0.0.0.0:80", ("0.0.0.0", 80)),
    ("[::1]:9000", ("::1", 9000)), (":7", ("127.0.0.1", 7)),
])
def test_http_addresses(text: str, want: tuple[str, int]) -> None:
    assert split_address(text) == want


@pytest.mark.parametrize("text", ["host", "h:70000", "h:-1", "h:", ""])
def test_a_bad_http_address_is_refused_by_the_cli(text: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["server", "--broker", "mqtt://h:1", "--out", "o", "--http", text])
    assert exited.value.code == 2
    assert "expected HOST:PORT or PORT" in capsys.readouterr().err


@pytest.fixture
def page() -> Iterator[tuple[FleetView, str]]:
    view = FleetView(P)
    view.started(RUN, ServerOptions(broker="x", out=None, train=TrainConfig()), [])  # type: ignore[arg-type]
    fp = FleetPage(view, "127.0.0.1:0", token="s3cret")
    url = fp.start()
    yield view, url
    fp.stop()


def _get(url: str, token: str | None = None) -> tuple[int, bytes, Any]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                 if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        return err.code, err.read(), err.headers


def test_api_state_needs_the_token_and_returns_the_snapshot(page: tuple[FleetView, str]) -> None:
    view, url = page
    _presence(view, _members(), "dev-1", "online")
    for path in ("api/state", "", "static/app.js", "api/events"):
        code, body, _ = _get(url + path)
        assert code == 401 and b"wrong token" in body, path
        assert _get(url + path, "s3cre")[0] == 401, path
    code, body, headers = _get(url + "api/state", "s3cret")
    assert code == 200 and headers["Content-Type"].startswith("application/json")
    state = json.loads(body)
    assert state["devices"][0]["id"] == "dev-1" and state["devices"][0]["online"] is True
    assert state["round"] is None and state["history"] == []
    code, body, _ = _get(url + "api/state?token=s3cret")  # what the page's own requests use
    assert code == 200 and json.loads(body)["run"]["run_id"] == RUN


def test_the_page_and_its_assets_are_served_from_the_package(
        page: tuple[FleetView, str]) -> None:
    _, url = page
    code, body, headers = _get(url, "s3cret")
    assert code == 200 and b"static/app.js" in body and b"<canvas" in body
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        code, _, headers = _get(url + "static/" + name, "s3cret")
        assert code == 200 and headers["Content-Type"].startswith(kind)
    assert _get(url + "static/..%2Fserver.py", "s3cret")[0] == 404
    assert _get(url + "static/nope.js", "s3cret")[0] == 404
    req = urllib.request.Request(url + "api/state", method="POST",
                                 headers={"Authorization": "Bearer s3cret"})
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 405  # read-only


def test_events_send_a_snapshot_at_once_and_again_on_a_change(
        page: tuple[FleetView, str]) -> None:
    view, url = page
    req = urllib.request.Request(url + "api/events", headers={"Authorization": "Bearer s3cret"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "text/event-stream"

        def event() -> dict[str, Any]:
            line = resp.readline()
            while not line.startswith(b"data: "):
                line = resp.readline()
            return json.loads(line[len(b"data: "):])

        assert event()["devices"] == []
        view.round_started(1, ("dev-1",), 30.0)
        assert event()["round"]["participants"] == ["dev-1"]


def test_a_taken_port_is_an_error_naming_the_flag(page: tuple[FleetView, str]) -> None:
    view, url = page
    port = url.rstrip("/").rsplit(":", 1)[1]
    with pytest.raises(OSError, match=f"--http 127.0.0.1:{port}: cannot listen"):
        FleetPage(view, f"127.0.0.1:{port}").start()


def test_a_page_opened_with_the_token_gets_a_cookie_for_its_own_requests(
        page: tuple[FleetView, str]) -> None:
    _, url = page
    with urllib.request.urlopen(url + "?token=s3cret", timeout=10) as resp:
        cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    req = urllib.request.Request(url + "static/app.js", headers={"Cookie": cookie.split(";")[0]})
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    assert _get(url + "static/app.js")[0] == 401  # and nothing without it


def test_a_run_feeds_the_view_what_the_page_shows(tmp_path: Path) -> None:
    """The loop's hooks, through a real in-process federation (no browser needed)."""
    from edge_runtime.device import Device, DeviceOptions, device_endpoint, message_limit
    from edge_runtime.transport.loopback import LoopbackBroker, LoopbackTransport
    from server.loop import Server
    from server.setup import build_run, server_endpoint

    broker = LoopbackBroker()
    opts = ServerOptions(broker="loopback", out=tmp_path / "run", devices=2, rounds=2,
                         join_timeout=60, round_timeout=60, threads=1, http="0",
                         train=TrainConfig(local_steps=4, upload_every=2, batch_size=16))
    run = build_run(opts)
    server = Server(run, LoopbackTransport.at(broker, server_endpoint(P, run.run_id)))
    assert isinstance(server.view, FleetView)
    threads = []
    for i in range(2):
        shard = tmp_path / f"dev-{i}.npz"
        np.savez(shard, x=run.data.x_train[i::2].astype(np.float32),
                 y=run.data.y_train[i::2].astype(np.int64))
        ep = device_endpoint(f"dev-{i}", P)
        t = LoopbackTransport(broker, ep.client_id, ep.subscriptions, will=ep.will,
                              max_message_bytes=message_limit(None))
        dev = Device(DeviceOptions(broker="loopback", device_id=f"dev-{i}", data=shard,
                                   threads=1, bundle_cache=tmp_path / "cache"), t)
        threads.append(threading.Thread(target=dev.run, daemon=True))
        threads[-1].start()
    server.run()
    for th in threads:
        th.join(30)
    snap = server.view.snapshot()
    assert snap["run"]["state"] == "finished" and snap["round"] is None
    assert [h["round"] for h in snap["history"]] == [1, 2]
    assert [h["test_accuracy"] for h in snap["history"]] == \
        [r["test_accuracy"] for r in server.records]
    assert [d["id"] for d in snap["devices"]] == ["dev-0", "dev-1"]
    for dev in snap["devices"]:
        assert dev["bytes_up"] > 0 and dev["peak_rss_mb"] > 0 and dev["step_ms_median"] > 0
        assert dev["profile"]["samples"] > 0 and dev["rejected"] == 0
    # a share of all the server received (which also counts messages from no device)
    assert sum(d["bytes_up"] for d in snap["devices"]) <= server.traffic.bytes_up
