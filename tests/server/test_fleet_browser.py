"""The live fleet page in a real headless browser (Debian's chromium, driven over the Chrome
DevTools Protocol with aiohttp's websocket client) against a running in-process federation:
the server loop with `--http`, three ONNX Runtime devices over the loopback broker.

The page loads, shows the devices online, marks a killed device offline within the
presence timeout, and its charts gain a point per completed round. Skipped only when no
chromium is installed (scripts/test.sh installs it when run as root).
With HERON_SCREENSHOT=PATH it also saves a screenshot of the page (docs/fleet-page.png)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from edge_runtime.device import Device, DeviceOptions, device_endpoint, message_limit
from edge_runtime.protocol import Message, TrainConfig, topics
from edge_runtime.transport.loopback import LoopbackBroker, LoopbackTransport
from server.fleet_page import FleetPage
from server.loop import Server
from server.options import ServerOptions
from server.setup import build_run, server_endpoint

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# A real broker publishes a dead client's will after 1.5 x its keepalive (15 s in
# edge_runtime.transport.mqtt): that is the presence timeout the page must keep.
PRESENCE_TIMEOUT_S = 1.5 * 15
TOKEN = "page-test-token"


class Chromium:
    """A headless chromium and one page, driven by DevTools Protocol commands."""

    def __init__(self, profile: Path) -> None:
        assert CHROMIUM is not None
        self.proc = subprocess.Popen(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1280,1000", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.exists() and port_file.read_text().count("\n") >= 1):
            assert time.monotonic() < deadline, "chromium did not open its DevTools port"
            time.sleep(0.1)
        port = int(port_file.read_text().split()[0])
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.loop = asyncio.new_event_loop()
        self.session = self.loop.run_until_complete(self._session())
        self.ws = self.loop.run_until_complete(
            self.session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0))
        self.next_id = 0

    async def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession()

    async def _call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:  # events arrive in between; only our reply counts
            msg = await asyncio.wait_for(self.ws.receive_json(), 30)
            if msg.get("id") == self.next_id:
                assert "error" not in msg, msg
                return msg["result"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        return self.loop.run_until_complete(self._call(method, params))

    def js(self, expression: str) -> Any:
        out = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return out["result"].get("value")

    def wait(self, expression: str, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            assert time.monotonic() < deadline, \
                f"page: {what} not within {timeout:.0f} s; it shows: " \
                f"{self.js('document.body.innerText.slice(0, 800)')}"
            time.sleep(0.2)

    def close(self) -> None:
        self.loop.run_until_complete(self.ws.close())
        self.loop.run_until_complete(self.session.close())
        self.loop.close()
        self.proc.terminate()
        self.proc.wait(10)


class Killed(Exception):
    """Ends a device thread as a crash would."""


KILL = threading.Event()


class KilledOnCue(LoopbackTransport):
    """dev-2's link dies at its first publish after KILL is set (its will goes out)."""

    def publish(self, topic: str, msg: Message, **kw: Any) -> int:
        if self.client_id.endswith("dev-2") and KILL.is_set():
            self.drop()
            raise Killed
        return super().publish(topic, msg, **kw)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Chromium]:
    if CHROMIUM is None:
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/test.sh "
                    "does it when run as root)")
    b = Chromium(tmp_path / "chromium-profile")
    yield b
    b.close()


def _devices(broker: LoopbackBroker, server: Server, root: Path, n: int,
             transport: Callable[..., LoopbackTransport]) -> list[threading.Thread]:
    data = server.data
    threads = []
    for i in range(n):
        shard = root / f"dev-{i}.npz"
        np.savez(shard, x=data.x_train[i::n].astype(np.float32),
                 y=data.y_train[i::n].astype(np.int64))
        dev = f"dev-{i}"
        ep = device_endpoint(dev, topics.DEFAULT_PREFIX)
        t = transport(broker, ep.client_id, ep.subscriptions, will=ep.will,
                      max_message_bytes=message_limit(None))
        device = Device(DeviceOptions(broker="loopback", device_id=dev, data=shard, threads=1,
                                      bundle_cache=root / "cache", wait_server_s=5), t)

        def go(device: Device = device) -> None:
            try:
                device.run()
            except Killed:
                pass

        th = threading.Thread(target=go, daemon=True)
        th.start()
        threads.append(th)
    return threads


def test_the_page_shows_the_fleet_live_in_a_real_browser(tmp_path: Path,
                                                         browser: Chromium) -> None:
    KILL.clear()
    broker = LoopbackBroker()
    opts = ServerOptions(broker="loopback", out=tmp_path / "run", devices=3, rounds=200,
                         join_timeout=60, round_timeout=60, threads=1, http="127.0.0.1:0",
                         http_token=TOKEN,
                         train=TrainConfig(local_steps=4, upload_every=2, batch_size=16))
    run = build_run(opts)
    server = Server(run, LoopbackTransport.at(broker, server_endpoint(opts.prefix, run.run_id)))
    page = FleetPage(server.view, opts.http or "", TOKEN)  # as `heron server --http` does
    url = page.start()
    result: dict[str, Any] = {}
    loop = threading.Thread(target=lambda: result.update(server.run()), daemon=True)
    loop.start()
    devices = _devices(broker, server, tmp_path, 3, KilledOnCue)
    try:
        browser.call("Page.navigate", url=f"{url}?token={TOKEN}")
        browser.wait("document.querySelectorAll('#devices tr[data-state=online]').length == 3",
                     60, "three devices online")
        ids = browser.js("[...document.querySelectorAll('#devices tr')].map(r => r.dataset.id)"
                         ".filter(Boolean)")
        assert ids == ["dev-0", "dev-1", "dev-2"]
        browser.wait("(window.fleet.points['chart-accuracy'] || 0) >= 1", 60,
                     "a point on the accuracy chart")
        before = browser.js("window.fleet.points['chart-accuracy']")
        KILL.set()
        t_kill = time.monotonic()
        browser.wait("document.querySelector('#devices tr[data-id=\"dev-2\"]')"
                     ".dataset.state == 'offline'", PRESENCE_TIMEOUT_S, "dev-2 offline")
        offline_after = time.monotonic() - t_kill
        # the rounds go on with two devices, and each one closed is a new point
        browser.wait(f"window.fleet.points['chart-accuracy'] >= {before + 2}", 60,
                     "two more rounds on the chart")
        assert browser.js("window.fleet.points['chart-loss']") >= before + 2
        assert browser.js("window.fleet.points['chart-bytes']") >= before + 2
        assert browser.js("document.getElementById('link').textContent") == "live"
        assert "reported" in browser.js("document.getElementById('round').textContent") or \
            browser.js("window.fleet.state.round") is None
        shot = os.environ.get("HERON_SCREENSHOT")
        if shot:
            png = browser.call("Page.captureScreenshot", format="png")["data"]
            Path(shot).write_bytes(base64.b64decode(png))
        print(f"dev-2 shown offline {offline_after:.2f} s after it was killed")
    finally:
        server.stop.set()
        loop.join(60)
        page.stop()
        for th in devices:
            th.join(15)
    assert result.get("interrupted") is True and not loop.is_alive()
