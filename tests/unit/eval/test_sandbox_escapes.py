"""Escape attempts against the bubblewrap jail (training/eval/sandbox.py).

Each attack is first run OUTSIDE the sandbox, as a plain `python -I -S` child of this test,
and shown to work there (so the test could fail), then run inside the jail, where it must
not. The reads are also run under the audit-hook guard alone (`--unsafe-sandbox`), which
does not stop them: that is what the jail adds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from training.eval.sandbox import (BLOCKED, FAILED, MEMORY, PASSED, TIMEOUT, Limits, SandboxUnavailable,
                                   bubblewrap_problem, check_isolation, run_program)

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(bubblewrap_problem() is not None, reason=str(bubblewrap_problem()))]

JAIL = Limits(timeout_s=3.0, memory_mb=512)
GUARD = Limits(timeout_s=3.0, memory_mb=512, isolation="guard")
PYTHON = os.path.realpath(sys.executable)


def outside(src: str, timeout: float = 30) -> subprocess.CompletedProcess:
    """The attack as a plain child process: what it can do with no sandbox at all."""
    return subprocess.run([PYTHON, "-I", "-S", "-c", src], capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def planted(tmp_path):
    """A secret outside the sample's folder: one in a temp folder, one in the real home
    (where ~/.ray/auth_token and cloud credentials live)."""
    secret = uuid.uuid4().hex
    files = [tmp_path / "planted.txt", Path.home() / f".codecomplete-sandbox-test-{secret[:8]}"]
    for f in files:
        f.write_text(secret)
    yield secret, files
    for f in files:
        f.unlink(missing_ok=True)


def test_reading_files_outside_works_without_the_jail_and_not_inside(planted):
    secret, files = planted
    for f in files:
        src = f"print(open({str(f)!r}).read())\n"
        assert secret in outside(src).stdout
        assert run_program(src, GUARD).status == PASSED  # the guard alone lets reads through
        r = run_program(src, JAIL)
        assert r.status == FAILED and "No such file" in r.stderr_tail and secret not in r.stderr_tail


def test_the_ray_auth_token_is_not_there_to_read():
    token = Path.home() / ".ray" / "auth_token"
    src = f"import os\nassert not os.path.exists({str(token)!r})\nassert not os.path.exists('/etc/passwd')\n"
    if token.exists():
        assert outside(src).returncode != 0  # readable outside
    assert run_program(src, JAIL).status == PASSED


def test_other_processes_are_visible_outside_and_not_inside():
    me = os.getpid()
    src = f"import os\nassert '{me}' not in os.listdir('/proc'), 'sees the test process'\n" \
          "assert len([p for p in os.listdir('/proc') if p.isdigit()]) <= 3\n"
    assert outside(src).returncode != 0
    assert run_program(src, JAIL).status == PASSED


def test_a_socket_to_a_local_server_reaches_it_outside_and_not_inside():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    got: list[bytes] = []

    def accept() -> None:
        server.settimeout(20)
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                got.append(conn.recv(64))

    threading.Thread(target=accept, daemon=True).start()
    src = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\ns.sendall(b'leak')\n"
    try:
        assert outside(src).returncode == 0
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert got == [b"leak"]
        # The hook refuses the import (the jail's own network namespace, with only a down
        # loopback, is test_sandbox.py's test_sample_runs_in_its_own_network_namespace).
        assert run_program(src, JAIL).status == BLOCKED
        time.sleep(0.5)
        assert got == [b"leak"]
    finally:
        server.close()


def test_writing_outside_the_folder_works_outside_and_not_inside(tmp_path):
    target = tmp_path / "escaped.txt"
    src = f"open({str(target)!r}, 'w').write('x')\n"
    assert outside(src).returncode == 0 and target.exists()
    target.unlink()
    r = run_program(src, JAIL)
    assert r.status in (BLOCKED, FAILED) and not target.exists()


def test_forking_works_outside_and_not_inside():
    src = "import os\nfor _ in range(20):\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n"
    assert outside(src).returncode == 0
    t0 = time.monotonic()
    r = run_program("import os\nwhile True:\n    os.fork()\n", JAIL)
    assert r.status == BLOCKED and time.monotonic() - t0 < JAIL.timeout_s + 5


def test_ctypes_calls_work_outside_and_not_inside():
    src = "import ctypes\nassert ctypes.CDLL(None).getpid() > 0\n"
    assert outside(src).returncode == 0
    assert run_program(src, JAIL).status == BLOCKED


def test_a_2_gb_allocation_works_outside_and_not_inside():
    src = "x = bytearray(2 * 1024**3)\nx[-1] = 1\n"
    assert outside(src, timeout=60).returncode == 0
    assert run_program(src, JAIL).status == MEMORY


def test_an_infinite_loop_runs_on_outside_and_is_killed_inside():
    src = "while True:\n    pass\n"
    with pytest.raises(subprocess.TimeoutExpired):
        outside(src, timeout=JAIL.timeout_s + 1)
    r = run_program(src, JAIL)
    assert r.status == TIMEOUT and r.duration_s < JAIL.timeout_s + 3


def test_killing_the_parent_works_outside_and_not_inside():
    attack = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n"
    # Outside: the attack's parent (a shell standing in for the evaluator) dies.
    parent = subprocess.run(["sh", "-c", f'"{PYTHON}" -I -S -c "$0"; sleep 30', attack], timeout=20)
    assert parent.returncode == -signal.SIGKILL
    # Inside: refused, and through C (no hook) the parent is not even in its PID namespace.
    assert run_program(attack, JAIL).status == BLOCKED
    src = "import os\nassert os.getppid() in (0, 1), os.getppid()\n"
    assert run_program(src, JAIL).status == PASSED


def test_a_missing_jail_is_refused_in_one_line_unless_the_guard_is_asked_for(monkeypatch):
    import training.eval.sandbox as sandbox

    monkeypatch.setattr(sandbox, "bubblewrap_problem", lambda: "bubblewrap is not installed")
    with pytest.raises(SandboxUnavailable, match="--unsafe-sandbox") as e:
        check_isolation("bwrap")
    assert "\n" not in str(e.value)
    with pytest.raises(SandboxUnavailable):
        run_program("assert True\n", JAIL)
    check_isolation("guard")
    assert run_program("assert True\n", GUARD).status == PASSED
