"""The process seam against real child processes (cheap and deterministic)."""

from __future__ import annotations

import gc
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import deferLater

from nixeryd.process import (
    NICENESS,
    ProcessResult,
    ProcessTimedOut,
    ReactorProcessRunner,
    descendants,
    kill_tree,
)


@pytest_twisted.inlineCallbacks
def test_stderr_lines_stream_and_stdout_is_collected() -> Any:
    lines: list[str] = []
    script = (
        "import sys, time\n"
        "sys.stderr.write('one\\ntw'); sys.stderr.flush(); time.sleep(0.05)\n"
        "sys.stderr.write('o\\nthree'); sys.stdout.write('{\"ok\": 1}')\n"
    )
    result: ProcessResult = yield ReactorProcessRunner(reactor).run(
        [sys.executable, "-c", script], timeout=10, on_stderr_line=lines.append
    )
    assert result.exit_code == 0
    assert result.stdout == b'{"ok": 1}'
    assert lines == ["one", "two", "three"]
    assert result.stderr_tail == ("one", "two", "three")


@pytest_twisted.inlineCallbacks
def test_exit_code_is_reported_not_raised() -> Any:
    result: ProcessResult = yield ReactorProcessRunner(reactor).run(
        [sys.executable, "-c", "import sys; print('bad', file=sys.stderr); sys.exit(3)"],
        timeout=10,
        on_stderr_line=lambda line: None,
    )
    assert result.exit_code == 3
    assert result.stderr_tail == ("bad",)


@pytest_twisted.inlineCallbacks
def test_timeout_kills_the_whole_process_group(tmp_path: Any) -> Any:
    pid_file = tmp_path / "grandchild.pid"
    # The child starts a grandchild that would outlive a plain kill of the child.
    script = (
        "import subprocess, sys, time\n"
        f"p = subprocess.Popen(['sleep', '60'])\n"
        f"open({str(pid_file)!r}, 'w').write(str(p.pid))\n"
        "print('started', file=sys.stderr, flush=True)\n"
        "time.sleep(60)\n"
    )
    lines: list[str] = []
    with pytest.raises(ProcessTimedOut) as raised:
        yield ReactorProcessRunner(reactor).run(
            [sys.executable, "-c", script], timeout=1.0, on_stderr_line=lines.append
        )
    assert raised.value.timeout == 1.0
    assert lines == ["started"]
    grandchild = int(pid_file.read_text())
    for _ in range(100):
        if not _alive(grandchild):
            break
        yield deferLater(reactor, 0.02, lambda: None)
    else:
        pytest.fail("the grandchild survived the timeout")


#: A child that starts a grandchild in a session of its own, as Nix starts its
#: builders: a kill of the child's process group misses it.
_SESSION_ESCAPING_CHILD = (
    "import os, subprocess, sys, time\n"
    "p = subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
    "open(sys.argv[1], 'w').write(str(p.pid))\n"
    "print('started', file=sys.stderr, flush=True)\n"
    "time.sleep(60)\n"
)


@pytest_twisted.inlineCallbacks
def _gone(pid: int) -> Any:
    for _ in range(100):
        if not _alive(pid):
            return True
        yield deferLater(reactor, 0.02, lambda: None)
    return False


@pytest_twisted.inlineCallbacks
def test_timeout_kills_a_grandchild_in_another_session(tmp_path: Any) -> Any:
    pid_file = tmp_path / "builder.pid"
    started = time.monotonic()
    with pytest.raises(ProcessTimedOut):
        yield ReactorProcessRunner(reactor).run(
            [sys.executable, "-c", _SESSION_ESCAPING_CHILD, str(pid_file)],
            timeout=1.0,
            on_stderr_line=lambda line: None,
        )
    # A surviving grandchild holds the stderr pipe: the timeout would be answered
    # only when it ends on its own.
    assert time.monotonic() - started < 10, "the timeout waited for the grandchild to end"
    assert (yield _gone(int(pid_file.read_text()))), "the grandchild survived the timeout"


@pytest_twisted.inlineCallbacks
def test_stopping_the_runner_kills_what_runs_with_its_tree(tmp_path: Any) -> Any:
    pid_file = tmp_path / "builder.pid"
    runner = ReactorProcessRunner(reactor)
    started: Deferred[None] = Deferred()
    running = runner.run(
        [sys.executable, "-c", _SESSION_ESCAPING_CHILD, str(pid_file)],
        timeout=60,
        on_stderr_line=lambda line: started.callback(None),
    )
    yield started
    assert runner.running == 1
    stopped = runner.stop()
    # Its caller is told at once, as an abandoned command's is: not "killed by SIGKILL".
    with pytest.raises(CancelledError):
        yield running
    yield stopped  # fires once the command is reaped
    assert runner.running == 0
    assert (yield _gone(int(pid_file.read_text()))), "the grandchild survived the stop"
    # A command asked for meanwhile (a build that waited for a Nix slot) is not started.
    with pytest.raises(OSError, match="stopping"):
        yield runner.run(["true"], timeout=5, on_stderr_line=lambda line: None)
    with pytest.raises(OSError, match="stopping"):
        runner.start(["cat"], on_stderr_line=lambda line: None)


class _RecordingPool:
    """The reactor's thread pool, noting the threads each spawn ran in."""

    def __init__(self) -> None:
        self.threads: list[int] = []
        self.spawned: list[Any] = []
        self._pool = reactor.getThreadPool()  # type: ignore[attr-defined]

    def callInThreadWithCallback(self, on_result: Any, work: Any, *args: Any) -> None:
        def noted() -> Any:
            self.threads.append(threading.get_ident())
            child = work(*args)
            self.spawned.append(child)
            return child

        self._pool.callInThreadWithCallback(on_result, noted)


@pytest_twisted.inlineCallbacks
def test_commands_are_spawned_off_the_reactor_thread_in_a_session_of_their_own() -> Any:
    # A spawn returns once the child has exec'd; on the reactor thread each spawn
    # stalled every cached answer for that long on busy cores.
    pool = _RecordingPool()
    script = (
        "import os, sys\n"
        "print(os.getsid(0) == os.getpid())\n"
        "print(sys.stdin.read() == '', file=sys.stderr)\n"
    )
    lines: list[str] = []
    result: ProcessResult = yield ReactorProcessRunner(reactor, pool).run(
        [sys.executable, "-c", script], timeout=10, on_stderr_line=lines.append
    )
    assert pool.threads and threading.get_ident() not in pool.threads
    assert result.exit_code == 0
    assert result.stdout == b"True\n"
    assert lines == ["True"]


@pytest_twisted.inlineCallbacks
def test_the_exit_status_is_the_reactors_even_when_subprocess_runs_meanwhile() -> Any:
    # Spawned with subprocess.Popen but reaped by the reactor: a later Popen (which polls
    # every Popen it has not reaped) or a collected one must not take the status first:
    # the command would never end.
    running = ReactorProcessRunner(reactor).run(
        [sys.executable, "-c", "import sys, time; time.sleep(0.3); sys.exit(7)"],
        timeout=10,
        on_stderr_line=lambda line: None,
    )
    yield deferLater(reactor, 0.1, lambda: None)  # spawned by now
    gc.collect()
    time.sleep(0.6)  # exits while the reactor, which would reap it, is held up here
    subprocess.run(["true"], check=True)
    result: ProcessResult = yield running
    assert result.exit_code == 7


@pytest_twisted.inlineCallbacks
def test_a_command_cancelled_while_it_is_spawned_is_killed() -> Any:
    pool = _RecordingPool()
    running = ReactorProcessRunner(reactor, pool).run(
        [sys.executable, "-c", "import time; time.sleep(60)"],
        timeout=60,
        on_stderr_line=lambda line: None,
    )
    running.cancel()  # before the worker thread has spawned it
    with pytest.raises(CancelledError):
        yield running
    for _ in range(100):
        if pool.spawned:
            break
        yield deferLater(reactor, 0.05, lambda: None)
    assert (yield _gone(pool.spawned[0].pid)), "the command outlived its cancellation"


@pytest_twisted.inlineCallbacks
def test_commands_run_nicer_than_the_daemon_and_what_they_start_inherits_it() -> Any:
    # Exec'd directly (no wrapper that lowers the priority in the child), so it is lowered
    # by pid right after the spawn; what the command starts later is nicer too. Where the
    # kernel schedules by session (autogroup), the command's session is nicer as well,
    # and the daemon's own is left as it was.
    autogroup = Path("/proc/self/autogroup")
    script = (
        "import os, pathlib, subprocess, sys, time\n"
        "time.sleep(0.2)\n"
        "autogroup = pathlib.Path('/proc/self/autogroup')\n"
        "print(os.getsid(0) == os.getpid(), os.nice(0))\n"
        "print(autogroup.read_text().split()[-1] if autogroup.exists() else 'none')\n"
        "sys.stdout.flush()\n"
        "subprocess.run([sys.executable, '-c', 'import os; print(os.nice(0))'])\n"
    )
    daemons_session = autogroup.read_text() if autogroup.exists() else "none"
    result: ProcessResult = yield ReactorProcessRunner(reactor).run(
        [sys.executable, "-c", script], timeout=10, on_stderr_line=lambda line: None
    )
    nicer = min(19, os.nice(0) + NICENESS)
    sessions_nice = str(nicer) if autogroup.exists() else "none"
    assert result.stdout.decode().split() == ["True", str(nicer), sessions_nice, str(nicer)]
    assert (autogroup.read_text() if autogroup.exists() else "none") == daemons_session


@pytest_twisted.inlineCallbacks
def test_a_program_not_on_path_is_an_os_error_naming_it() -> Any:
    runner = ReactorProcessRunner(reactor)
    with pytest.raises(FileNotFoundError, match="no-such-nix-store"):
        yield runner.run(
            ["no-such-nix-store", "--version"],
            timeout=10,
            on_stderr_line=lambda line: None,
            env={"PATH": "/nonexistent"},
        )
    with pytest.raises(OSError, match="no-such-nix"):
        runner.start(["no-such-nix"], on_stderr_line=lambda line: None, env={"PATH": "/x"})


def test_descendants_cross_sessions(tmp_path: Any) -> None:
    pid_file = tmp_path / "builder.pid"
    child = subprocess.Popen(
        [sys.executable, "-c", _SESSION_ESCAPING_CHILD, str(pid_file)], stderr=subprocess.PIPE
    )
    try:
        assert child.stderr is not None
        child.stderr.readline()
        grandchild = int(pid_file.read_text())
        assert grandchild in descendants(child.pid)
        kill_tree(child.pid)
        child.wait(timeout=10)
        for _ in range(100):
            if not _alive(grandchild):
                break
            time.sleep(0.02)
        else:
            pytest.fail("kill_tree left the grandchild running")
    finally:
        child.kill()
        child.wait()


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as dead)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return not any(line.startswith("State:\tZ") for line in status)
    except FileNotFoundError:
        return False


@pytest_twisted.inlineCallbacks
def test_an_interactive_command_answers_each_line_it_is_sent() -> Any:
    """As the evaluator drives ``nix repl``: requests on stdin, answers on stderr."""
    script = (
        "import sys\n"
        "for line in sys.stdin:\n"
        "    print('answer ' + line.strip(), file=sys.stderr, flush=True)\n"
        "    print('dropped', flush=True)\n"
    )
    lines: list[str] = []
    answered: Deferred[None] = Deferred()

    def on_line(line: str) -> None:
        lines.append(line)
        if len(lines) == 2:
            answered.callback(None)

    process = ReactorProcessRunner(reactor).start(
        [sys.executable, "-c", script], on_stderr_line=on_line
    )
    assert process.pid is not None
    process.write(b"one\n")
    process.write(b"two\n")
    yield answered
    assert lines == ["answer one", "answer two"]
    process.kill()
    status = yield process.ended
    assert status == 128 + signal.SIGKILL


@pytest_twisted.inlineCallbacks
def test_lines_are_read_as_a_terminal_shows_them() -> Any:
    """Nix 2.18 clears its progress line before a trace, even into a pipe."""
    script = (
        "import sys\n"
        "sys.stderr.write('\\r\\x1b[K\\r\\x1b[Ktrace: answer\\n')\n"
        "sys.stderr.write('\\x1b[31;1merror:\\x1b[0m boom\\r\\n')\n"
    )
    result: ProcessResult = yield ReactorProcessRunner(reactor).run(
        [sys.executable, "-c", script], timeout=10, on_stderr_line=lambda line: None
    )
    assert result.stderr_tail == ("trace: answer", "error: boom")
