"""The device's smashed-data uplink (edge_runtime/uplink.py): batches published in
order on another thread, bounded, and a failure raised in the sender, never lost."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from edge_runtime.uplink import Uplink, make_uplink

A, Y = np.zeros((2, 3), np.float32), np.zeros(2, np.int64)


def test_batches_go_out_in_order_on_the_worker_thread() -> None:
    got: list[tuple[int, str]] = []

    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        got.append((step, threading.current_thread().name))

    with Uplink(publish) as up:
        for step in range(0, 20, 2):
            up.send(step, A, Y)
        up.flush()
        assert [s for s, _ in got] == list(range(0, 20, 2))  # all of them, after flush
        assert {name for _, name in got} == {"heron-uplink"}


def test_a_send_does_not_wait_for_the_publish() -> None:
    """The point of the thread: the step goes on while the batch is coded and published."""
    release = threading.Event()

    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        release.wait(30)

    with Uplink(publish) as up:
        t0 = time.monotonic()
        up.send(0, A, Y)
        assert time.monotonic() - t0 < 10  # a publish would have waited 30 s
        release.set()
        up.flush()


def test_at_most_depth_batches_wait_then_the_sender_does() -> None:
    started, release = threading.Event(), threading.Event()

    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        started.set()
        release.wait(30)

    with Uplink(publish, depth=1) as up:
        up.send(0, A, Y)
        assert started.wait(10)  # the worker holds batch 0 in its publish
        up.send(1, A, Y)  # the one queued batch
        third = threading.Thread(target=up.send, args=(2, A, Y))
        third.start()
        third.join(0.3)
        assert third.is_alive()  # blocked: the queue is full
        release.set()
        third.join(10)
        assert not third.is_alive()
        up.flush()


def test_a_failure_is_raised_in_the_sender_and_drops_the_rounds_later_batches() -> None:
    done: list[int] = []
    go = threading.Event()

    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        go.wait(30)  # steps 1 and 2 are queued before step 1 fails
        if step == 1:
            raise ValueError("activations beyond |1e+30| cannot be int8-coded")
        done.append(step)

    up = Uplink(publish)
    up.send(0, A, Y)
    up.send(1, A, Y)
    up.send(2, A, Y)  # queued while the worker holds step 0 (depth 2)
    go.set()
    with pytest.raises(ValueError, match="int8-coded"):
        up.flush()
    assert done == [0]  # step 2 came after the failure: dropped, not published half-way
    up.send(3, A, Y)  # the failure was taken: the uplink is usable again
    up.flush()
    assert done == [0, 3]
    up.close()
    with pytest.raises(RuntimeError, match="closed"):
        up.send(4, A, Y)


def test_a_failure_is_raised_at_the_next_send() -> None:
    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        raise ValueError("refused")

    with Uplink(publish) as up:
        up.send(0, A, Y)
        up._queue.join()  # the worker has met the failure
        with pytest.raises(ValueError, match="refused"):
            up.send(1, A, Y)


def test_close_publishes_what_is_queued() -> None:
    done: list[int] = []
    up = Uplink(lambda step, act, labels: done.append(step))
    for step in range(5):
        up.send(step, A, Y)
    up.close()
    assert done == list(range(5))
    with pytest.raises(ValueError, match="depth"):
        Uplink(lambda step, act, labels: None, depth=0)


def test_the_inline_uplink_publishes_in_the_caller() -> None:
    got: list[tuple[int, str]] = []

    def publish(step: int, act: np.ndarray, labels: np.ndarray) -> None:
        got.append((step, threading.current_thread().name))

    with make_uplink(publish, threaded=False) as up:
        up.send(0, A, Y)
        assert got == [(0, threading.current_thread().name)]  # done before send returned
        up.flush()
    threaded = make_uplink(publish, threaded=True)
    assert isinstance(threaded, Uplink)
    threaded.close()
