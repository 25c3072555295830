"""Run untrusted Python (model completions) in a limited child process.

Every program runs in a FRESH interpreter process (`python -I -S -B`), never in ours:
- its own new, empty temporary directory as cwd, HOME and TMPDIR (removed afterwards);
- rlimits set before the program starts: CPU seconds, address space (memory), size of any
  file written, no core dumps;
- a wall-clock timeout after which its whole process group is SIGKILLed;
- stdout/stderr go to files (so a program that prints forever is stopped by the file-size
  limit, not by filling our memory);
- no network: a new network namespace (`unshare -rn`, only loopback, down) where the kernel
  allows unprivileged user namespaces; in any case an audit hook (PEP 578) that refuses
  socket creation;
- the same audit hook refuses: opening a file for writing, deleting, renaming, chmod-ing or
  linking anything outside its directory; starting processes (fork, exec, spawn, subprocess,
  os.system), sending signals; ctypes; changing rlimits.

What this does NOT guarantee (see docs/evaluation.md): audit hooks are not a security
boundary. Code that reaches C (ctypes is refused, but a crafted extension module or an
interpreter bug) can bypass them; reads of the file system are allowed; when we run as root
and `unshare` is unavailable, file permissions protect nothing. For hostile code, run the
whole evaluation inside a container or VM with no credentials. For benchmark completions
from a model (the use here) it stops the usual accidents: hangs, memory blowups, stray
writes, `os.system("rm ...")`, network calls.
"""

from __future__ import annotations

import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

# Runs inside the child before the program: limits, then the audit hook, then the program.
# It is passed with `-c`, so nothing the program can edit defines the guard.
_GUARD = r'''
import os, sys, resource, traceback
cpu_s, mem_b, fsize_b, prog, done_fd = (int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]),
                                        sys.argv[4], int(sys.argv[5]))
# A pass is "ran to the end", not "exit status 0": os._exit(0) or sys.exit() in a completion
# must not pass. The parent hands a one-time token on stdin; only reaching the end writes it.
token = sys.stdin.readline().strip().encode()
sys.stdin.close()
_write, _exit, _flush = os.write, os._exit, sys.stdout.flush
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
resource.setrlimit(resource.RLIMIT_AS, (mem_b, mem_b))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize_b, fsize_b))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
with open(prog, encoding="utf-8") as f:
    code = compile(f.read(), "solution.py", "exec")
ROOT = os.path.realpath(os.getcwd())
_realpath, _fspath, _sep = os.path.realpath, os.fspath, os.sep
DENY_PREFIX = ("socket.", "ctypes.", "subprocess.", "os.exec", "os.spawn", "os.posix_spawn",
               "os.fork", "resource.set", "resource.prlimit", "winreg.", "_winapi.")
DENY = {"os.system", "os.kill", "os.killpg", "signal.pthread_kill", "os.startfile",
        "pty.spawn", "sys.remote_exec", "os.setns", "os.unshare"}
DENY_IMPORT = {"ctypes", "_ctypes", "_posixsubprocess", "socket", "_socket", "ssl", "_ssl"}
PATH_EVENTS = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.symlink", "os.link",
               "os.chmod", "os.chown", "os.truncate", "os.utime", "os.chflags", "os.lchflags",
               "os.mkfifo", "os.mknod", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
               "shutil.copystat", "shutil.move", "os.setxattr", "os.removexattr"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def _inside(p):
    if isinstance(p, int):  # an already open descriptor
        return True
    p = _fspath(p)
    if isinstance(p, bytes):
        p = p.decode("utf-8", "surrogateescape")
    r = _realpath(p)
    return r == ROOT or r.startswith(ROOT + _sep)

def _deny(what):
    raise PermissionError("sandbox: " + what + " is not allowed")

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writing = any(m in mode for m in "wax+") if isinstance(mode, str) else bool(flags & WRITE_FLAGS)
        if writing and path is not None and not _inside(path):
            _deny("writing " + repr(path))
    elif event in PATH_EVENTS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)) and not _inside(a):
                _deny(event + " on " + repr(a))
    elif event == "import":
        if args[0] in DENY_IMPORT:
            _deny("import " + args[0])
    elif event in DENY or event.startswith(DENY_PREFIX):
        _deny(event)

sys.addaudithook(_hook)
del f
sys.argv = ["solution.py"]
try:
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
except BaseException:  # SystemExit included: exiting early is not passing
    traceback.print_exc()
    _exit(1)
_flush()
_write(done_fd, token)
_exit(0)  # do not wait for threads the program may have left running
'''

# Outcomes. Only PASSED counts as a pass; everything else is a fail, never an error of ours.
PASSED, FAILED, TIMEOUT, MEMORY, BLOCKED, KILLED = "passed", "failed", "timeout", "memory", "blocked", "killed"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0
    """Wall-clock seconds before the process group is killed."""
    memory_mb: int = 1024
    """Address-space limit (RLIMIT_AS) in MiB."""
    cpu_s: Optional[int] = None
    """CPU-seconds limit (RLIMIT_CPU). None: ceil(timeout_s) + 1."""
    file_size_mb: int = 16
    """Largest file (stdout/stderr included) the program may write, in MiB."""


@dataclass
class ExecResult:
    status: str
    returncode: Optional[int]
    duration_s: float
    stderr_tail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == PASSED

    def to_dict(self) -> dict:
        return asdict(self)


@functools.lru_cache(maxsize=1)
def network_namespace_available() -> bool:
    """True when `unshare -rn` works here (unprivileged user namespaces are allowed)."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _command(prog: Path, limits: Limits, done_fd: int) -> list[str]:
    cpu_s = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    cmd = [sys.executable, "-I", "-S", "-B", "-c", _GUARD, str(cpu_s),
           str(limits.memory_mb * 2**20), str(limits.file_size_mb * 2**20), str(prog), str(done_fd)]
    if network_namespace_available():
        cmd = ["unshare", "-rn", "--"] + cmd
    return cmd


def _classify(rc: Optional[int], timed_out: bool, finished: bool, stderr: str) -> str:
    if timed_out or rc == -signal.SIGXCPU:
        return TIMEOUT
    if rc == 0 and finished:
        return PASSED
    if "MemoryError" in stderr:
        return MEMORY
    if "PermissionError: sandbox:" in stderr:
        return BLOCKED
    if rc is not None and rc < 0:  # SIGKILL from the OOM killer, SIGSEGV, SIGXFSZ...
        return KILLED
    return FAILED


def run_program(source: str, limits: Limits = Limits()) -> ExecResult:
    """Run `source` as a script in a fresh sandboxed process. Running to the end is a pass
    (exit status 0 alone is not: `os._exit(0)` or `sys.exit()` before the tests fail).

    Never raises for anything the program does: hangs, crashes and refused actions are
    results. Only a failure to start the interpreter at all raises (OSError).
    """
    work = Path(tempfile.mkdtemp(prefix="sandbox-"))
    start = time.monotonic()
    try:
        prog = work / "solution.py"
        prog.write_text(source, encoding="utf-8")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work), "TMPDIR": str(work),
               "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}
        token = secrets.token_hex(16)
        done_r, done_w = os.pipe()
        try:
            with open(work / ".stdout", "wb") as out, open(work / ".stderr", "wb") as err:
                proc = subprocess.Popen(_command(prog, limits, done_w), cwd=work, env=env, stdin=subprocess.PIPE,
                                        stdout=out, stderr=err, start_new_session=True, close_fds=True,
                                        pass_fds=(done_w,))
                os.close(done_w)
                done_w = -1
                timed_out = _supervise(proc, token, limits.timeout_s)
            os.set_blocking(done_r, False)
            try:
                finished = os.read(done_r, 64) == token.encode()
            except BlockingIOError:
                finished = False
        finally:
            os.close(done_r)
            if done_w != -1:
                os.close(done_w)
        stderr = (work / ".stderr").read_bytes()[-2000:].decode("utf-8", "replace")
        rc = None if timed_out else proc.returncode
        return ExecResult(_classify(rc, timed_out, finished, stderr), rc, time.monotonic() - start, stderr)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _supervise(proc: subprocess.Popen, token: str, timeout_s: float) -> bool:
    """Hand over the token, wait, kill the process group. True when it ran out of time."""
    try:
        proc.stdin.write((token + "\n").encode())
        proc.stdin.close()
    except (BrokenPipeError, OSError):  # it died at start-up; wait() tells
        pass
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        # Kill the whole group even after a normal exit: nothing it started may outlive it.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    return timed_out


def run_many(sources: Sequence[str], limits: Limits = Limits(), workers: Optional[int] = None) -> list[ExecResult]:
    """Run many programs, `workers` child processes at a time (threads only wait on them)."""
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
