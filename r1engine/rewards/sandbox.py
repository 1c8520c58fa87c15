"""Run untrusted, model-generated Python in a contained child process.

Two strengths, picked once per process by :func:`sandbox_strength` (and logged once):

``"bubblewrap"`` (``bwrap`` installed and working): the program runs under ``bwrap --unshare-all``: new
user, PID, network (loopback only, no route out), mount, IPC and UTS namespaces; a read-only filesystem made
of ``/usr`` (the interpreter and its standard library), ``/proc``, a minimal ``/dev``, the program at
``/code``; the only writable places are two size-limited tmpfs mounts, ``/sandbox`` (its working directory,
``max_disk_bytes``) and ``/dev/shm`` (``max_shm_bytes``). Nothing else of the host exists inside: not the
project tree, not ``/etc``, not ``/root``. All capabilities are dropped, nested user namespaces are disabled,
and when the PID namespace's init dies every process of the program dies with it. The process limit is set
inside the new user namespace, where the kernel counts only the sandbox's own processes and threads (set
outside, it would count every thread of the caller's uid and fail the start once the trainer has that many).
The program runs as the namespace's PID 1 (``--as-pid-1``), so no bwrap helper outlives a run as a zombie.

``"rlimit"`` (fallback, weaker, used only when the caller opts in with ``allow_weak``): a plain child process
in a fresh temporary directory (a size-limited tmpfs mounted there when the caller is root, as a disk quota),
Python isolated mode (``-I -S``), a scrubbed environment, a new network namespace when the kernel allows it
(root), and a Python audit hook installed before the program runs that refuses sockets, subprocesses,
``os.system``, ``fork``/``exec``, signals, ``ctypes``, and opening/listing/removing paths outside the temporary
directory (reads of the standard library allowed). An audit hook is NOT a security boundary: C extensions and
interpreter bugs bypass it, operations without audit events (``os.mkfifo``, ``os.mknod``, ``os.setxattr``,
``shm_open``) are not seen at all, a path relative to a ``dir_fd`` escapes its check, a rename racing the
check beats it, and without a mount namespace the host filesystem is still there. Hence
:class:`SandboxUnavailable` unless the caller accepts it.

Both modes add, around the child: a new session/process group (``setsid``), rlimits on CPU time
(``RLIMIT_CPU``), address space (``RLIMIT_AS``), processes+threads (``RLIMIT_NPROC``), file size
(``RLIMIT_FSIZE``), open files and core dumps; a wall-clock limit; stdout+stderr read with a byte cap
(the child is killed when it exceeds it). When the caller is root (and the sandbox interpreter is
reachable by other users: a system ``/usr/bin/python3`` is preferred), the child also drops to a fresh
unprivileged uid (it cannot signal the caller, and file permissions protect root-owned files) and is placed
in per-run cgroup-v1 ``memory`` and ``pids`` groups when those are writable (total memory including tmpfs
pages, total process count). On exit or timeout the whole process group and every process left in the
cgroup are SIGKILLed, and the temporary directory removed. A failure of bwrap itself is a
``"sandbox error"`` (logged loudly once per message), never a silent switch to the weaker mode.

Environment checked when this was written (root in a Firecracker VM, Debian 12, kernel 6.x): ``bwrap`` 0.8
works with user/pid/net namespaces for root and for unprivileged users; ``RLIMIT_NPROC`` is NOT enforced for
a uid-0 child even inside a user namespace, hence the uid drop; cgroup v1 ``memory``/``pids`` are writable by
root.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import resource
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from .isolated import set_pdeathsig

_log = logging.getLogger(__name__)
_counter = itertools.count()
_STRENGTH: str | None = None
_WEAK_WHY = ""  # why the probe settled on the rlimit mode
_REPORTED: set[str] = set()  # sandbox failures already logged
_CGROUP_V1 = "/sys/fs/cgroup"


class SandboxUnavailable(RuntimeError):
    """Only the weaker rlimit sandbox is available (or forced) and the caller did not accept it."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one sandboxed run (all per run)."""

    wall_time_s: float = 5.0
    cpu_time_s: float | None = None  # None: same as wall_time_s (rounded up)
    memory_bytes: int = 512 << 20
    max_processes: int = 16  # processes + threads of the sandbox uid
    max_file_bytes: int = 16 << 20  # largest file the program may write
    max_disk_bytes: int = 32 << 20  # writable space of the working directory (tmpfs size)
    max_shm_bytes: int = 8 << 20  # writable space of /dev/shm (bubblewrap mode)
    max_output_bytes: int = 1 << 20  # stdout + stderr
    max_open_files: int = 64

    def __post_init__(self) -> None:
        for name in (
            "wall_time_s",
            "memory_bytes",
            "max_processes",
            "max_file_bytes",
            "max_output_bytes",
            "max_disk_bytes",
            "max_shm_bytes",
        ):
            if getattr(self, name) <= 0:
                raise ValueError(f"SandboxLimits: {name} must be > 0, got {getattr(self, name)}")


@dataclass
class SandboxResult:
    """What happened. ``status``: "ok" (exit 0), "error" (non-zero exit), "timeout", "output limit",
    "memory limit", "file size limit", "killed" (other signal), "sandbox error"."""

    status: str
    returncode: int | None
    stdout: str
    stderr: str
    wall_s: float
    strength: str
    reason: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


# --------------------------------------------------------------------------------------------- helpers


def _world_executable(path: str) -> bool:
    """True when an unprivileged user can execute ``path`` (every parent searchable, file o+x)."""
    path = os.path.realpath(path)
    try:
        if not os.stat(path).st_mode & stat.S_IXOTH:
            return False
        d = os.path.dirname(path)
        while True:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return False
            if d == "/":
                return True
            d = os.path.dirname(d)
    except OSError:
        return False


def sandbox_python() -> str:
    """The interpreter used inside the sandbox: a system ``python3`` under /usr (bind-mounted read-only in
    bubblewrap mode and reachable by an unprivileged uid), else this interpreter."""
    for cand in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.path.exists(cand) and _world_executable(cand):
            return cand
    return os.path.realpath(sys.executable)


def _is_root() -> bool:
    return os.geteuid() == 0


def _cgroups_usable() -> bool:
    return _is_root() and all(os.access(f"{_CGROUP_V1}/{c}", os.W_OK) for c in ("memory", "pids"))


def _bwrap_base(code_dir: str, limits: SandboxLimits, python: str) -> list[str]:
    cmd = ["bwrap", "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session"]
    cmd += ["--as-pid-1", "--cap-drop", "ALL", "--ro-bind", "/usr", "/usr"]
    for d in ("/bin", "/lib", "/lib64", "/lib32", "/sbin"):
        if os.path.islink(d):
            cmd += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            cmd += ["--ro-bind", d, d]
    if not python.startswith("/usr/"):
        prefix = os.path.dirname(os.path.dirname(python))
        cmd += ["--ro-bind", prefix, prefix]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(limits.max_shm_bytes), "--tmpfs", "/dev/shm"]
    cmd += ["--remount-ro", "/dev", "--ro-bind", code_dir, "/code"]
    cmd += ["--size", str(limits.max_disk_bytes), "--tmpfs", "/sandbox", "--chdir", "/sandbox"]
    # The root itself is a tmpfs without a size: read-only, or a program could fill memory through it.
    cmd += ["--remount-ro", "/", "--clearenv"]
    for k, v in (("PATH", "/usr/bin:/bin"), ("HOME", "/sandbox"), ("TMPDIR", "/sandbox"), ("LANG", "C.UTF-8")):
        cmd += ["--setenv", k, v]
    return cmd


# Runs first inside the bubblewrap sandbox: the process limit, set in the new user namespace (where only the
# sandbox's processes count), then the program in a fresh interpreter.
_LAUNCH = r"""
import os, resource, sys
n = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_NPROC, (n, n))
os.execv(sys.executable, [sys.executable, "-u", "-I", "-S", "-B", "/code/main.py"])
"""


def _probe_bwrap() -> str | None:
    """None when bwrap works here, else why not."""
    if shutil.which("bwrap") is None:
        return "bwrap is not installed"
    res = _run("print(6 * 7)", "", SandboxLimits(wall_time_s=20.0), "bubblewrap")
    if res.status == "ok" and res.stdout.strip() == "42":
        return None
    return f"bwrap is installed but does not work here ({res.status}: {res.stderr.strip()[-300:]})"


def sandbox_strength() -> str:
    """``"bubblewrap"`` or ``"rlimit"`` (weaker; see the module docstring); probed once and logged once.

    ``R1ENGINE_SANDBOX=rlimit`` forces the fallback."""
    global _STRENGTH, _WEAK_WHY
    if _STRENGTH is None:
        forced = os.environ.get("R1ENGINE_SANDBOX", "").strip().lower()
        if forced not in ("", "bubblewrap", "rlimit"):
            raise ValueError(f"R1ENGINE_SANDBOX must be 'bubblewrap' or 'rlimit', got {forced!r}")
        why = "R1ENGINE_SANDBOX=rlimit forces it" if forced == "rlimit" else _probe_bwrap()
        _STRENGTH, _WEAK_WHY = ("rlimit", why) if why else ("bubblewrap", "")
        if _STRENGTH == "bubblewrap":
            _log.info("sandbox: using bubblewrap (namespaces) + rlimits%s", " + cgroups" if _cgroups_usable() else "")
        else:
            _log.warning(
                "sandbox: only the WEAKER rlimit + audit-hook sandbox is available (%s); install the Debian package "
                "'bubblewrap' for namespace isolation",
                why,
            )
    return _STRENGTH


def weak_sandbox_reason(strength: str | None = None) -> str | None:
    """Why ``strength`` (default: this process's choice) is the weak rlimit mode, or None when it is bubblewrap."""
    if strength is None:
        return (_WEAK_WHY or "bubblewrap is unavailable") if sandbox_strength() == "rlimit" else None
    return "the caller forces it" if strength == "rlimit" else None


def require_sandbox(strength: str | None = None, *, allow_weak: bool = False, who: str = "sandbox") -> str | None:
    """Check that programs can run contained in ``strength`` (None: this process's choice) and return it.

    Raises :class:`SandboxUnavailable`, naming why, when that is the weak rlimit mode and ``allow_weak`` is off."""
    if strength not in (None, "bubblewrap", "rlimit"):
        raise ValueError(f"{who}: sandbox must be None, 'bubblewrap' or 'rlimit', got {strength!r}")
    why = weak_sandbox_reason(strength)
    if why is not None and not allow_weak:
        raise SandboxUnavailable(
            f"{who}: refusing to run model-generated programs in the weak rlimit sandbox ({why}): it does not contain "
            "writes through dir_fd, FIFOs, device nodes, extended attributes or POSIX shared memory. Install "
            "bubblewrap (apt-get install bubblewrap) or accept the weak sandbox with rewards.allow_weak_sandbox=true"
        )
    return strength


# The rlimit-mode wrapper: reads the program, installs the audit hook, then runs the program.
_GUARD = r"""
import sys, os
_root = os.path.realpath(os.getcwd())
_prog = open(sys.argv[1], "rb").read()
_ro = tuple({os.path.realpath(p) + os.sep for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)})
_ro_ok = ("/dev/null", "/dev/urandom", "/dev/zero")
_deny_prefix = ("socket.", "subprocess.", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
                "os.system", "os.kill", "os.killpg", "os.setuid", "ctypes.", "pty.", "os.startfile",
                "_posixsubprocess", "os.add_dll_directory", "sys.remote_exec", "mmap.")
_path_events = {"os.remove": 0, "os.rmdir": 0, "os.rename": 0, "os.replace": 0, "os.listdir": 0, "os.scandir": 0,
                "os.chdir": 0, "os.chmod": 0, "os.chown": 0, "os.mkdir": 0, "os.symlink": 0, "os.link": 0,
                "os.truncate": 0, "os.utime": 0, "shutil.rmtree": 0, "os.walk": 0, "glob.glob": 0}
_list_events = ("os.listdir", "os.scandir", "os.walk", "glob.glob")
def _ro_dirs(a):
    rp = os.path.realpath(os.fsdecode(a)).rstrip(os.sep) + os.sep
    return (rp,) if rp.startswith(_ro) else ()
def _inside(p):
    try:
        p = os.path.realpath(os.fsdecode(p))
    except Exception:
        return False
    return p == _root or p.startswith(_root + os.sep)
def _hook(event, args):
    if event.startswith(_deny_prefix):
        raise PermissionError(f"sandbox: {event} is not allowed")
    if event == "open":
        path, mode = args[0], args[1]
        if isinstance(path, int) or _inside(path):
            return
        writing = isinstance(mode, str) and any(c in mode for c in "wax+")
        if isinstance(args[2], int) and args[2] & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND):
            writing = True
        rp = os.path.realpath(os.fsdecode(path))
        if not writing and (rp.startswith(_ro) or rp in _ro_ok):
            return
        raise PermissionError(f"sandbox: open({path!r}) outside the sandbox directory is not allowed")
    if event in _path_events:
        for a in args[:2]:
            if not isinstance(a, (str, bytes, os.PathLike)) or _inside(a):
                continue
            if event in _list_events and os.path.realpath(os.fsdecode(a)).rstrip(os.sep) + os.sep in _ro_dirs(a):
                continue
            if True:
                raise PermissionError(f"sandbox: {event}({a!r}) outside the sandbox directory is not allowed")
sys.addaudithook(_hook)
del _hook
sys.argv = ["main.py"]
exec(compile(_prog, "main.py", "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _unshare_net() -> None:
    # CLONE_NEWNET: an empty network namespace (no interfaces up), so no connection can succeed.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.unshare(0x40000000)


def _mount_tmpfs(path: str, size: int, uid: int | None) -> str | None:
    """Root only: a size-limited tmpfs on the fallback's work dir (a disk quota); None if not possible."""
    if not _is_root():
        return None
    owner = f",uid={uid},gid={uid}" if uid is not None else ""
    libc = ctypes.CDLL(None, use_errno=True)
    opts = f"size={int(size)},mode=0700{owner}".encode()
    ms_nosuid, ms_nodev = 2, 4
    if libc.mount(b"tmpfs", path.encode(), b"tmpfs", ms_nosuid | ms_nodev, opts) != 0:
        _log.debug("sandbox: tmpfs mount failed (errno %d); no disk quota", ctypes.get_errno())
        return None
    return path


def _umount(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.umount2(path.encode(), 2)  # MNT_DETACH


def _make_preexec(limits: SandboxLimits, uid: int | None, cgroups: list[str], unshare_net: bool, nproc: bool):
    cpu = int(limits.cpu_time_s if limits.cpu_time_s is not None else limits.wall_time_s + 0.999) or 1
    rl = [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (limits.memory_bytes, limits.memory_bytes)),
        (resource.RLIMIT_FSIZE, (limits.max_file_bytes, limits.max_file_bytes)),
        (resource.RLIMIT_NOFILE, (limits.max_open_files, limits.max_open_files)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]
    if nproc:  # the rlimit mode; bubblewrap sets it inside its user namespace (_LAUNCH)
        rl.append((resource.RLIMIT_NPROC, (limits.max_processes, limits.max_processes)))

    def preexec() -> None:  # runs in the child between fork and exec: keep it simple
        os.setsid()
        set_pdeathsig()
        pid = str(os.getpid())
        for cg in cgroups:
            with open(os.path.join(cg, "cgroup.procs"), "w") as f:
                f.write(pid)
        if unshare_net:
            _unshare_net()
        for which, lim in rl:
            resource.setrlimit(which, lim)
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)

    return preexec


def _make_cgroups(limits: SandboxLimits, tag: str) -> list[str]:
    if not _cgroups_usable():
        return []
    made = []
    try:
        mem = f"{_CGROUP_V1}/memory/r1engine-sbx-{tag}"
        os.mkdir(mem)
        made.append(mem)
        with open(f"{mem}/memory.limit_in_bytes", "w") as f:
            f.write(str(limits.memory_bytes + limits.max_disk_bytes))
        pids = f"{_CGROUP_V1}/pids/r1engine-sbx-{tag}"
        os.mkdir(pids)
        made.append(pids)
        with open(f"{pids}/pids.max", "w") as f:
            f.write(str(limits.max_processes + 4))
    except OSError as e:
        _log.debug("sandbox: cgroups not usable (%s)", e)
        _remove_cgroups(made)
        return []
    return made


def _kill_cgroups(cgroups: list[str], spare: int | None = None) -> None:
    for _ in range(50):
        alive = False
        for cg in cgroups:
            try:
                with open(os.path.join(cg, "cgroup.procs")) as f:
                    pids = [int(x) for x in f.read().split() if int(x) != spare]
            except OSError:
                continue
            for p in pids:
                alive = True
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        if not alive:
            return
        time.sleep(0.01)


def _remove_cgroups(cgroups: list[str]) -> None:
    for cg in cgroups:
        for _ in range(100):
            try:
                os.rmdir(cg)
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)


def _memory_failed(cgroups: list[str]) -> bool:
    for cg in cgroups:
        if "/memory/" in cg:
            try:
                with open(os.path.join(cg, "memory.failcnt")) as f:
                    return int(f.read().strip() or 0) > 0
            except OSError:
                return False
    return False


def _sandbox_uid() -> int | None:
    if not _is_root():
        return None
    return 200_000 + (os.getpid() % 8192) * 64 + next(_counter) % 64


def _run(code: str, stdin: str, limits: SandboxLimits, strength: str) -> SandboxResult:
    t0 = time.monotonic()
    tag = f"{os.getpid()}-{next(_counter)}"
    uid = _sandbox_uid()
    base = tempfile.mkdtemp(prefix="r1sbx-")
    cgroups: list[str] = []
    proc = None
    mounted = None
    try:
        code_dir = os.path.join(base, "code")
        os.mkdir(code_dir)
        with open(os.path.join(code_dir, "main.py"), "w", encoding="utf-8") as f:
            f.write(code)
        python = sandbox_python()
        if uid is not None and not _world_executable(python):
            uid = None  # an unprivileged uid could not even start the interpreter: keep the caller's uid
        os.chmod(base, 0o755)
        os.chmod(code_dir, 0o755)
        os.chmod(os.path.join(code_dir, "main.py"), 0o644)
        if strength == "bubblewrap":
            with open(os.path.join(code_dir, "launch.py"), "w") as f:
                f.write(_LAUNCH)
            os.chmod(os.path.join(code_dir, "launch.py"), 0o644)
            argv = _bwrap_base(code_dir, limits, python)
            argv += [python, "-I", "-S", "-B", "/code/launch.py", str(limits.max_processes)]
            cwd, env, net = base, {"PATH": "/usr/bin:/bin"}, False
        else:
            work = os.path.join(base, "work")
            os.mkdir(work, 0o700)
            if uid is not None:
                os.chown(work, uid, uid)
            mounted = _mount_tmpfs(work, limits.max_disk_bytes, uid)
            guard = os.path.join(code_dir, "guard.py")
            with open(guard, "w") as f:
                f.write(_GUARD)
            os.chmod(guard, 0o644)
            argv = [python, "-u", "-I", "-S", "-B", guard, os.path.join(code_dir, "main.py")]
            cwd, net = work, _is_root()
            env = {"PATH": "/usr/bin:/bin", "HOME": work, "TMPDIR": work, "LANG": "C.UTF-8"}
        cgroups = _make_cgroups(limits, tag)
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=env,
            close_fds=True,
            preexec_fn=_make_preexec(limits, uid, cgroups, net, nproc=strength == "rlimit"),
        )
        status, out, err = _communicate(proc, stdin.encode("utf-8", "replace"), limits, t0)
        rc = proc.returncode
        return _classify(status, rc, out, err, time.monotonic() - t0, strength, cgroups)
    except OSError as e:
        return SandboxResult("sandbox error", None, "", str(e), time.monotonic() - t0, strength, f"sandbox error: {e}")
    finally:
        if proc is not None:
            if proc.poll() is None:
                # Kill what runs inside first, so the outer bwrap reaps its own children and exits (killing
                # it first would leave its children to PID 1, a zombie per run where no init reaps them).
                if cgroups:
                    _kill_cgroups(cgroups, spare=proc.pid)
                else:
                    _kill_descendants(proc.pid)
                try:
                    proc.wait(timeout=1.0)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(proc)
        _kill_cgroups(cgroups)
        _remove_cgroups(cgroups)
        if mounted:
            _umount(mounted)
        shutil.rmtree(base, ignore_errors=True)


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc/<pid>/task/<tid>/children), parents before children."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for children in (f"/proc/{p}/task/{tid}/children" for tid in _tasks(p)):
            try:
                with open(children) as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out += kids
            todo += kids
    return out


def _tasks(pid: int) -> list[str]:
    try:
        return os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []


def _kill_descendants(pid: int) -> None:
    for p in _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()
    for f in (proc.stdin, proc.stdout, proc.stderr):
        if f is not None:
            try:
                f.close()
            except OSError:
                pass


def _communicate(proc: subprocess.Popen, data: bytes, limits: SandboxLimits, t0: float) -> tuple[str, bytes, bytes]:
    """Feed stdin, read stdout/stderr with a byte cap until exit or the wall limit. Returns (status, out, err)."""
    deadline = t0 + limits.wall_time_s
    bufs = {proc.stdout: bytearray(), proc.stderr: bytearray()}
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    sel.register(proc.stderr, selectors.EVENT_READ)
    view = memoryview(data)
    if data:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    total = 0
    status = "exited"
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                return "timeout", bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])
            for key, _ in sel.select(min(left, 0.5)):
                f = key.fileobj
                if f is proc.stdin:
                    try:
                        n = os.write(f.fileno(), view[:65536])
                        view = view[n:]
                    except (BrokenPipeError, BlockingIOError, OSError):
                        view = view[:0]
                    if not view:
                        sel.unregister(f)
                        f.close()
                    continue
                chunk = os.read(f.fileno(), 65536)
                if not chunk:
                    sel.unregister(f)
                    continue
                total += len(chunk)
                bufs[f] += chunk
                if total > limits.max_output_bytes:
                    return "output limit", bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])
        # Pipes closed (the program may have closed stdout early): wait for the exit with the time left.
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
    finally:
        sel.close()
    return status, bytes(bufs[proc.stdout]), bytes(bufs[proc.stderr])


def _classify(
    status: str, rc: int | None, out: bytes, err: bytes, wall: float, strength: str, cgroups: list[str]
) -> SandboxResult:
    so = out.decode("utf-8", "replace")
    se = err.decode("utf-8", "replace")
    last = se.strip().splitlines()[-1][:200] if se.strip() else ""
    if strength == "bubblewrap" and rc == 1 and se.startswith("bwrap: "):  # bwrap failed before the program ran
        reason = f"sandbox error: {last}"
        if reason not in _REPORTED:
            _REPORTED.add(reason)
            _log.error("sandbox: bubblewrap failed to start a program (%s); it scores as failed", last)
        return SandboxResult("sandbox error", rc, so, se, wall, strength, reason)
    if status == "timeout":
        return SandboxResult("timeout", rc, so, se, wall, strength, "timeout")
    if status == "output limit":
        return SandboxResult("output limit", rc, so, se, wall, strength, "killed: output limit")
    if rc is None:
        rc = -signal.SIGKILL
    sig = -rc if rc < 0 else (rc - 128 if strength == "bubblewrap" and 128 < rc < 160 else 0)
    if sig:
        if sig in (signal.SIGXCPU,):
            return SandboxResult("timeout", rc, so, se, wall, strength, "timeout (cpu time limit)")
        if sig == signal.SIGXFSZ:
            return SandboxResult("file size limit", rc, so, se, wall, strength, "killed: file size limit")
        if sig == signal.SIGKILL and _memory_failed(cgroups):
            return SandboxResult("memory limit", rc, so, se, wall, strength, "killed: memory limit")
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return SandboxResult("killed", rc, so, se, wall, strength, f"killed: signal {name}")
    if rc != 0:
        if "MemoryError" in last or _memory_failed(cgroups):
            return SandboxResult("memory limit", rc, so, se, wall, strength, "killed: memory limit")
        if "File too large" in se:
            return SandboxResult("file size limit", rc, so, se, wall, strength, "file size limit")
        return SandboxResult("error", rc, so, se, wall, strength, f"exit code {rc}: {last}" if last else f"exit {rc}")
    return SandboxResult("ok", rc, so, se, wall, strength, None)


def run_python(
    code: str,
    stdin: str = "",
    limits: SandboxLimits | None = None,
    strength: str | None = None,
    *,
    allow_weak: bool = False,
) -> SandboxResult:
    """Run ``code`` (a Python program) with ``stdin`` in the sandbox; never raises for anything the program does.

    Args:
        code: program text (untrusted).
        stdin: text fed to the program's standard input.
        limits: resource limits (defaults: 5 s wall, 512 MiB, 16 processes, 1 MiB output).
        strength: force "bubblewrap" or "rlimit" (default: :func:`sandbox_strength`).
        allow_weak: accept the weaker "rlimit" mode; without it that mode raises :class:`SandboxUnavailable`.
    """
    if not isinstance(code, str):
        raise TypeError(f"run_python: code must be a str, got {type(code).__name__}")
    limits = limits or SandboxLimits()
    require_sandbox(strength, allow_weak=allow_weak, who="run_python")
    strength = strength or sandbox_strength()
    if "\x00" in code:
        return SandboxResult("error", None, "", "", 0.0, strength, "program contains NUL bytes")
    return _run(code, stdin, limits, strength)
