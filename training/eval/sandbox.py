"""Run untrusted Python (model completions) in a jail: bubblewrap around a limited interpreter.

Every program runs in a FRESH interpreter process (`python -I -S -B`), never in ours, and
by default inside **bubblewrap** (`bwrap`, what Flatpak uses), which builds the child an
empty root of its own:
- mounted: the interpreter, its standard library and the shared libraries they load
  (read-only), the sample's own new, empty folder (read-write: cwd, HOME, TMPDIR), a
  private /proc, a minimal /dev and an empty /tmp; nothing else of the host's file system,
  so `~/.ray/auth_token`, storage credentials and other users' files are not there to read;
- new user, PID, IPC, UTS, cgroup and network namespaces (only loopback, down): it sees
  only its own processes, cannot signal ours, cannot reach a socket on 127.0.0.1;
- `--cap-drop ALL`, `--die-with-parent`, `--new-session` (no terminal to inject into);
- inside, before the program: rlimits (CPU seconds, address space, size of any file
  written, no core dumps) and an audit hook (PEP 578) that refuses sockets, processes,
  signals, ctypes, rlimit changes and writes outside its folder: a second layer, and the
  reason a refused action is reported as "blocked" rather than as a crash;
- a wall-clock timeout after which the whole process group is SIGKILLed (the jail's PID 1
  dies with it, and the kernel kills everything left in its PID namespace).

Where bubblewrap cannot run (not installed, or user namespaces are off), `run_program`
refuses: `isolation="guard"` (the CLI's `--unsafe-sandbox`) runs the audit-hook guard alone,
which by CPython's own account is no security boundary: reads of the file system stay
possible and code that reaches C gets past it. See docs/evaluation.md.
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
from typing import Literal, Optional, Sequence

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


ISOLATIONS = ("bwrap", "guard")


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here, and the caller did not accept the guard alone."""


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
    isolation: Literal["bwrap", "guard"] = "bwrap"
    """bwrap: the bubblewrap jail around the guard (refused where bubblewrap cannot run);
    guard: the audit hook and rlimits alone, no file-system isolation (`--unsafe-sandbox`)."""


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


def _interpreter() -> str:
    """The real interpreter binary (a venv's python is a link to it; -I -S needs no venv)."""
    return os.path.realpath(sys.executable)


@functools.lru_cache(maxsize=1)
def _jail_mounts() -> tuple[str, ...]:
    """bwrap arguments that mount the interpreter, its standard library and the shared
    libraries both load, read-only, at their own paths; the base site-packages hidden."""
    import sysconfig

    exe = _interpreter()
    stdlib = os.path.realpath(sysconfig.get_paths()["stdlib"])
    files = {exe}
    dynload = Path(stdlib) / "lib-dynload"
    objects = [exe, *map(str, dynload.glob("*.so"))]
    for obj in objects:
        try:
            out = subprocess.run(["ldd", obj], capture_output=True, text=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        for line in out.splitlines():
            parts = line.split()
            path = parts[2] if len(parts) >= 3 and parts[1] == "=>" else parts[0] if parts else ""
            if path.startswith("/"):
                files.add(path)
                files.add(os.path.realpath(path))
    args = ["--ro-bind", stdlib, stdlib]
    site = Path(stdlib) / "site-packages"
    if site.is_dir():
        args += ["--tmpfs", str(site)]
    for f in sorted(files):
        if os.path.exists(f) and not f.startswith(stdlib + os.sep):
            args += ["--ro-bind", f, f]
    return tuple(args)


def _jail(work: Path) -> list[str]:
    return ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
            "--hostname", "sandbox", *_jail_mounts(), "--proc", "/proc", "--dev", "/dev", "--tmpfs", "/tmp",
            "--bind", str(work), str(work), "--chdir", str(work), "--"]


@functools.lru_cache(maxsize=1)
def bubblewrap_problem() -> Optional[str]:
    """None when the bubblewrap jail runs here, else one line saying why not."""
    if not shutil.which("bwrap"):
        return "bubblewrap is not installed (Debian: apt-get install bubblewrap; scripts/setup.sh does it)"
    work = Path(tempfile.mkdtemp(prefix="sandbox-probe-"))
    try:
        r = subprocess.run([*_jail(work), _interpreter(), "-I", "-S", "-c", "import json"],
                           capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"bubblewrap did not start: {e}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or ["exit status " + str(r.returncode)])[-1]
        return f"bubblewrap cannot run here ({why}); user namespaces may be disabled"
    return None


def check_isolation(isolation: str) -> None:
    """Raise SandboxUnavailable, in one line, when `isolation` cannot be had here."""
    if isolation not in ISOLATIONS:
        raise ValueError(f"isolation must be one of {ISOLATIONS}, not {isolation!r}")
    problem = bubblewrap_problem() if isolation == "bwrap" else None
    if problem:
        raise SandboxUnavailable(f"refusing to run generated code: {problem}. Pass --unsafe-sandbox to run it "
                                 "under the audit-hook guard alone (no file-system isolation)")


def _command(prog: Path, limits: Limits, done_fd: int, work: Path) -> list[str]:
    cpu_s = limits.cpu_s if limits.cpu_s is not None else math.ceil(limits.timeout_s) + 1
    cmd = [_interpreter(), "-I", "-S", "-B", "-c", _GUARD, str(cpu_s),
           str(limits.memory_mb * 2**20), str(limits.file_size_mb * 2**20), str(prog), str(done_fd)]
    if limits.isolation == "bwrap":
        return _jail(work) + cmd
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
    results. Raises SandboxUnavailable when the isolation asked for cannot run here, and
    OSError when the interpreter cannot start at all.
    """
    check_isolation(limits.isolation)
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
                proc = subprocess.Popen(_command(prog, limits, done_w, work), cwd=work, env=env, stdin=subprocess.PIPE,
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
        if limits.isolation == "bwrap" and rc is not None and rc > 128:
            rc = 128 - rc  # bwrap reports a child killed by signal N as exit status 128 + N
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
    check_isolation(limits.isolation)
    workers = workers or max(1, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda s: run_program(s, limits), sources))
