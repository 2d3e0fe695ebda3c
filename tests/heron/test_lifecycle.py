"""How heron processes stop: one graceful stop per process, and none outliving its parent."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from conftest import ROOT

from heron.lifecycle import PARENT_ENV, Stopped, StopSignals, exit_code


def test_exit_codes_follow_the_shell_convention() -> None:
    assert exit_code(signal.SIGINT) == 130
    assert exit_code(signal.SIGTERM) == 143


def test_the_first_stop_signal_raises_and_later_ones_are_ignored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with StopSignals() as signals:
        with pytest.raises(Stopped) as caught:
            signal.raise_signal(signal.SIGTERM)
            time.sleep(1)  # the handler runs at the next bytecode, long before this ends
        assert caught.value.signum == signal.SIGTERM
        signal.raise_signal(signal.SIGINT)  # a second stop (e.g. `timeout` signals twice)
        assert signals.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == before  # restored


def test_a_stop_inside_a_deferred_block_is_raised_when_the_block_ends() -> None:
    started = []
    with StopSignals() as signals, pytest.raises(Stopped):
        with signals.deferred():
            signal.raise_signal(signal.SIGTERM)
            started.append("child")  # e.g. a Popen whose result must not be lost
        started.append("never")
    assert started == ["child"]


def test_a_callback_stop_sets_a_flag_instead_of_raising() -> None:
    seen: list[int] = []
    with StopSignals(seen.append):
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGTERM)
    assert seen == [signal.SIGINT]


# A process that starts a child the way `heron run` does, then waits to be killed.
PARENT = textwrap.dedent("""
    import subprocess, sys, time
    from heron.lifecycle import child_env
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=child_env())
    print(child.pid, flush=True)
    time.sleep(600)
""")
CHILD = textwrap.dedent("""
    import sys, time
    import heron.lifecycle as lifecycle
    if {fallback}:
        lifecycle._set_pdeathsig = lambda signum: False  # as on a system without prctl
    assert lifecycle.die_with_parent(poll_s=0.1)
    with lifecycle.StopSignals():
        try:
            time.sleep(600)
        except lifecycle.Stopped as exc:
            open({marker!r}, "w").write(str(exc.signum))
""")


@pytest.mark.parametrize("fallback", [False, True], ids=["prctl", "getppid-watch"])
def test_a_child_stops_when_its_parent_is_killed(fallback: bool, tmp_path: Path) -> None:
    if not fallback and not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux only")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(PARENT_ENV, None)
    marker = tmp_path / "stopped"
    child_code = CHILD.format(fallback=fallback, marker=str(marker))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, child_code], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout is not None
        child = psutil.Process(int(parent.stdout.readline()))
        time.sleep(1.0)  # let the child get as far as die_with_parent
        assert child.is_running()
        parent.kill()
        parent.wait(10)
        gone, alive = psutil.wait_procs([child], timeout=10)
        assert not alive, "the child outlived its SIGKILLed parent"
        # it got SIGTERM and stopped through its handler (not ours to reap: read its note)
        assert marker.read_text() == str(int(signal.SIGTERM))
    finally:
        if parent.poll() is None:
            parent.kill()


def test_the_parent_variable_is_not_inherited_further(tmp_path: Path) -> None:
    code = ("import os, heron.lifecycle as l; l.die_with_parent(); "
            f"print(os.environ.get({PARENT_ENV!r}))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), PARENT_ENV: str(os.getpid())}
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.stdout.strip() == "None", out.stderr
