"""The sandbox stops what completions may do: hang, eat memory, crash, write outside, connect."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from training.eval.sandbox import (BLOCKED, FAILED, KILLED, MEMORY, PASSED, TIMEOUT, Limits,
                                   network_namespace_available, run_many, run_program)

pytestmark = pytest.mark.timeout(120)

FAST = Limits(timeout_s=2.0, memory_mb=512)


def test_a_good_program_passes_and_a_failing_assert_fails():
    assert run_program("assert sum(range(5)) == 10\n", FAST).status == PASSED
    r = run_program("assert 1 + 1 == 3\n", FAST)
    assert r.status == FAILED and "AssertionError" in r.stderr_tail


def test_infinite_loop_is_killed_within_its_limit():
    t0 = time.monotonic()
    r = run_program("while True:\n    pass\n", FAST)
    assert r.status == TIMEOUT and not r.passed
    assert time.monotonic() - t0 < FAST.timeout_s + 3


def test_sleeping_forever_is_killed_by_the_wall_clock():
    # CPU limits do not catch a sleeper; the wall-clock kill of the process group does.
    r = run_program("import time\ntime.sleep(1000)\n", Limits(timeout_s=1.0))
    assert r.status == TIMEOUT and r.duration_s < 4


def test_memory_bomb_is_stopped():
    # 8 GiB would succeed on this machine without the limit.
    r = run_program("x = bytearray(8 * 1024**3)\nx[-1] = 1\n", FAST)
    assert r.status == MEMORY and not r.passed
    r = run_program("chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024**2))\n", FAST)
    assert r.status in (MEMORY, KILLED) and not r.passed


def test_write_outside_its_directory_is_contained(tmp_path: Path):
    target = tmp_path / f"escaped-{uuid.uuid4().hex}.txt"
    for src in (f"open({str(target)!r}, 'w').write('x')\n",
                f"import os\nfd = os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)\nos.write(fd, b'x')\n",
                f"import os\nos.chdir({str(tmp_path)!r})\nopen({target.name!r}, 'a').write('x')\n",
                f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')\n"):
        r = run_program(src, FAST)
        # Refused by the guard, or (in the jail) the folder is not even there to write to.
        assert r.status in (BLOCKED, FAILED) and not r.passed, r.stderr_tail
        assert not target.exists()
    # Deleting or renaming what lies outside is refused too.
    victim = tmp_path / "keep.txt"
    victim.write_text("precious")
    r = run_program(f"import os\nos.remove({str(victim)!r})\n", FAST)
    assert r.status == BLOCKED and victim.read_text() == "precious"


def test_writing_inside_its_own_directory_is_allowed():
    src = ("import os, tempfile\nopen('scratch.txt', 'w').write('ok')\n"
           "assert open('scratch.txt').read() == 'ok'\nos.remove('scratch.txt')\n"
           "with tempfile.NamedTemporaryFile('w') as f:\n    f.write('x')\n")
    assert run_program(src, FAST).status == PASSED


def test_crash_counts_as_fail():
    r = run_program("import faulthandler\nfaulthandler._sigsegv()\n", FAST)
    assert r.status == KILLED and not r.passed
    assert run_program("raise SystemExit(3)\n", FAST).status == FAILED


@pytest.mark.parametrize("src", ["import sys\nsys.exit(0)\nassert False\n", "import os\nos._exit(0)\nassert False\n",
                                 "exit()\nassert False\n"])
def test_exiting_early_with_status_zero_is_not_a_pass(src):
    # A completion that exits before the tests run must not be scored as passing them.
    assert run_program(src, FAST).status == FAILED


@pytest.mark.parametrize("src", [
    "import socket\nsocket.create_connection(('127.0.0.1', 9))\n",
    "import os\nos.system('true')\n",
    "import subprocess\nsubprocess.run(['true'])\n",
    "import os\nos.fork()\n",
    "import ctypes\n",
    "import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))\n",
])
def test_network_processes_and_escapes_are_refused(src):
    r = run_program(src, FAST)
    assert r.status == BLOCKED, r.stderr_tail


def test_runaway_output_is_bounded():
    r = run_program("while True:\n    print('x' * 10000)\n", Limits(timeout_s=5.0, file_size_mb=1))
    assert not r.passed and r.duration_s < 5


def _interfaces(dev_text: str) -> list[str]:
    return [line.split(":")[0].strip() for line in dev_text.splitlines()[2:]]


@pytest.mark.skipif(not network_namespace_available(), reason="unprivileged user namespaces are not allowed here")
def test_sample_runs_in_its_own_network_namespace():
    # /proc/self/net/dev lists the interfaces of the process's network namespace: in the
    # sandbox only loopback (down), so no route out even for code that got past the hook.
    host = _interfaces(Path("/proc/self/net/dev").read_text())
    src = ("ifaces = [l.split(':')[0].strip() for l in open('/proc/self/net/dev').read().splitlines()[2:]]\n"
           "assert ifaces == ['lo'], ifaces\n")
    r = run_program(src, FAST)
    assert r.status == PASSED, r.stderr_tail
    if host != ["lo"]:
        assert run_program(src.replace("== ['lo']", "== " + repr(host)), FAST).status == FAILED


def test_many_in_parallel_keep_their_order_and_one_hang_does_not_stop_the_rest():
    srcs = ["assert True\n", "while True: pass\n", "assert False\n", "x = 1\n"]
    t0 = time.monotonic()
    rs = run_many(srcs, Limits(timeout_s=2.0), workers=2)
    assert [r.status for r in rs] == [PASSED, TIMEOUT, FAILED, PASSED]
    assert time.monotonic() - t0 < 8
