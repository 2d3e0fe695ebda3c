"""The embedded broker past its limit: one line pointing to Mosquitto, no tracebacks."""

from __future__ import annotations

import io
import logging

from server.broker import EMBEDDED_BROKER_DEVICES, QuietBrokerLog, too_many_devices


def _fail(logger: logging.Logger, exc: Exception) -> None:
    try:
        raise exc
    except Exception:
        logger.exception("Task failed and will be skipped: <Task ...>")


def test_puback_timeouts_become_one_line_that_points_to_mosquitto() -> None:
    stream = io.StringIO()
    handler = QuietBrokerLog(stream)
    logger = logging.getLogger("amqtt.test_broker_limit")
    logger.propagate = False
    logger.addHandler(handler)
    try:
        for packet in range(3):
            _fail(logger, TimeoutError(f"Timeout waiting for PUBACK for packet ID {packet}"))
        _fail(logger, ConnectionResetError("peer went away"))
    finally:
        logger.removeHandler(handler)
    lines = stream.getvalue().splitlines()
    assert handler.timeouts == 3 and handler.errors == 1
    assert "Traceback" not in stream.getvalue()
    assert len(lines) == 2
    assert "falling behind" in lines[0] and "--broker" in lines[0]
    assert "heron devices provision" in lines[0]
    assert lines[1].endswith("ConnectionResetError: peer went away")


def test_run_warns_past_the_measured_limit_only() -> None:
    assert too_many_devices(EMBEDDED_BROKER_DEVICES) is None
    warning = too_many_devices(EMBEDDED_BROKER_DEVICES + 1)
    assert warning is not None
    assert "Mosquitto" in warning and "heron devices provision" in warning
