"""Security suite: hostile programs run through the code reward must be contained.

For every program and every sandbox strength available here: the caller survives and returns within a
bound, the reward is 0 with a reason, a canary file outside the sandbox and the project's files are
unchanged, no connection reaches a listener on 127.0.0.1, no sandbox process or cgroup is left behind.
Read attacks use the secret itself as the test's expected output, so a leak would score 1.0.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from r1engine.rewards.code import CodeReward
from r1engine.rewards.sandbox import SandboxLimits, SandboxUnavailable, run_python, sandbox_strength

ROOT = Path(__file__).resolve().parents[1]
PROJECT_FILE = ROOT / "r1engine" / "rewards" / "__init__.py"
SECRET_ENV = "R1ENGINE_TEST_SECRET"
SECRET = "s3cr3t-token-do-not-leak"

STRENGTHS = ["rlimit"] + (["bubblewrap"] if shutil.which("bwrap") and sandbox_strength() == "bubblewrap" else [])


class Listener:
    """A TCP listener on 127.0.0.1 that records whether anything connected."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            try:
                c, _ = self.sock.accept()
                self.connections += 1
                c.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self.stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def env():
    d = tempfile.mkdtemp(prefix="r1-security-")
    canary = os.path.join(d, "canary.txt")
    Path(canary).write_text("canary")
    os.chmod(d, 0o777)  # even world-writable: only the sandbox may stop a write, not permissions of the dir
    os.chmod(canary, 0o666)
    listener = Listener()
    os.environ[SECRET_ENV] = SECRET
    with open("/etc/shadow") if os.access("/etc/shadow", os.R_OK) else open(os.devnull) as f:
        shadow = f.readline().strip() or "root:*:x"
    yield {"dir": d, "canary": canary, "port": listener.port, "listener": listener, "shadow": shadow}
    listener.close()
    os.environ.pop(SECRET_ENV, None)
    shutil.rmtree(d, ignore_errors=True)


# name -> (program, expected output). "{...}" fields are filled from the env fixture.
HOSTILE = {
    "fork_bomb": ("import os\nwhile True:\n    os.fork()\n", "done"),
    "memory_bomb": ("a = []\nwhile True:\n    a.append(bytearray(50 * 1024 * 1024))\n", "done"),
    "infinite_loop": ("while True:\n    pass\n", "done"),
    "sleep_past_timeout": ("import time\ntime.sleep(60)\nprint('done')\n", "done"),
    "read_project_file": ("print(open({project!r}).readline().strip())\n", "{project_line}"),
    "read_etc_shadow": ("print(open('/etc/shadow').readline().strip())\n", "{shadow}"),
    "read_shadow_via_proc_root": ("print(open('/proc/1/root/etc/shadow').readline().strip())\n", "{shadow}"),
    "symlink_escape": ("import os\nos.symlink('/etc/shadow', 'x')\nprint(open('x').readline().strip())\n", "{shadow}"),
    "write_outside": ("open({canary!r}, 'w').write('pwned')\nprint('done')\n", "done"),
    "delete_outside": ("import os\nos.remove({canary!r})\nprint('done')\n", "done"),
    "append_project_file": ("open({project!r}, 'a').write('# pwned')\nprint('done')\n", "done"),
    "rmtree_outside": ("import shutil\nshutil.rmtree({dir!r})\nprint('done')\n", "done"),
    "network_connect": (
        "import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=0.5)\nprint('done')\n",
        "done",
    ),
    "spawn_shell": ("import os\nif os.system('echo pwned > {dir}/shell.txt') == 0:\n    print('done')\n", "done"),
    "subprocess_shell": (
        "import subprocess\nif subprocess.run(['sh', '-c', 'echo x > {dir}/s.txt']).returncode == 0:\n"
        "    print('done')\n",
        "done",
    ),
    "signal_parent": (
        "import os, signal, time\npp = os.getppid()\nos.kill(pp, signal.SIGKILL)\ntime.sleep(0.2)\n"
        "if os.getppid() != pp:\n    print('done')\n",
        "done",
    ),
    "kill_caller": ("import os, signal\nos.kill({caller}, signal.SIGKILL)\nprint('done')\n", "done"),
    "killpg_caller": ("import os, signal\nos.killpg(os.getpgid({caller}), signal.SIGKILL)\nprint('done')\n", "done"),
    "print_gigabytes": ("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n", "done"),
    "fill_disk": ("i = 0\nwhile True:\n    open(f'f{{i}}', 'w').write('a' * (1 << 20))\n    i += 1\n", "done"),
    "close_stdout_early": ("import os, time\nos.close(1)\nos.close(2)\ntime.sleep(60)\n", "done"),
    "ctypes_kill_caller": ("import ctypes\nif ctypes.CDLL(None).kill({caller}, 9) == 0:\n    print('done')\n", "done"),
    "ctypes_system": (
        "import ctypes\nif ctypes.CDLL(None).system(b'echo pwned > {dir}/ct.txt') == 0:\n    print('done')\n",
        "done",
    ),
    "huge_recursion": ("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)\n", "done"),
    "threads_bomb": (
        "import threading, time\nfor _ in range(10**5):\n    threading.Thread(target=time.sleep, args=(60,)).start()\n",
        "done",
    ),
    "read_env_secret": ("import os\nprint(os.environ.get({secret_env!r}, 'missing'))\n", SECRET),
    "setsid_escape_then_write": (
        "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(1.5)\n"
        "    open({canary!r}, 'w').write('late')\n    os._exit(0)\nprint('partial')\n",
        "done",
    ),
    "giant_file": ("open('big', 'w').write('a' * (200 << 20))\nprint('done')\n", "done"),
    "exec_python_without_guard": (
        "import os\nos.execv('/usr/bin/python3', ['python3', '-c', 'open({canary!r}, \"w\").write(\"x\")'])\n",
        "done",
    ),
    # A path relative to a dir_fd taken before a chdir deep down: the cwd-relative check sees a path inside.
    "dir_fd_after_chdir": (
        "import os\nd = '/'.join(['d'] * 12)\nos.makedirs(d)\ntop = os.open('.', os.O_RDONLY)\nos.chdir(d)\n"
        "fd = os.open('../' * 12 + {canary!r}.lstrip('/'), os.O_WRONLY | os.O_TRUNC, dir_fd=top)\n"
        "os.write(fd, b'pwned')\nprint('done')\n",
        "done",
    ),
    "mkfifo_outside": ("import os\nos.mkfifo({dir!r} + '/fifo')\nprint('done')\n", "done"),
    "mknod_outside": ("import os\nos.mknod({dir!r} + '/node')\nprint('done')\n", "done"),
    "setxattr_outside": ("import os\nos.setxattr({canary!r}, 'user.pwned', b'1')\nprint('done')\n", "done"),
    "shm_open_on_host": (
        "import _posixshmem, os\n_posixshmem.shm_open('/r1-security-pwned', os.O_CREAT | os.O_RDWR, 0o600)\n"
        "print('done')\n",
        "contained if not on the host",  # shared memory inside the sandbox is fine: the snapshot checks the host's
    ),
    # A directory holding a symlink whose relative target is harmless deep down and escapes at the top, swapped
    # with a harmless directory under one name while the main thread opens a path through it: check and open race.
    "rename_race": (
        "import os, threading, time\nd = '/'.join(['d'] * 12)\nos.makedirs(d + '/E')\nos.makedirs('P')\n"
        "os.chdir(d + '/E')\nos.symlink('../' * 13 + {canary!r}.lstrip('/'), 'evil')\nos.chdir('../' * 13)\n"
        "os.rename(d + '/E', 'E')\n"
        "open('P/evil', 'w').close()\nstop = False\n"
        "def flip():\n    while not stop:\n        for x in ('E', 'P'):\n            try:\n"
        "                os.rename(x, 'name'); os.rename('name', x)\n            except OSError:\n"
        "                pass\n"
        "threading.Thread(target=flip, daemon=True).start()\nend = time.time() + 1.5\nwon = False\n"
        "while time.time() < end and not won:\n    try:\n        open('name/evil', 'w').write('pwned')\n"
        "        won = open({canary!r}).read() == 'pwned'\n    except Exception:\n        pass\n"
        "stop = True\nprint('done' if won else 'lost')\n",
        "done",
    ),
    "write_root_filesystem": ("open('/pwned', 'w').write('x')\nprint('done')\n", "done"),
    "write_dev": ("open('/dev/pwned', 'w').write('x')\nprint('done')\n", "done"),
    "fill_dev_shm": (
        "i = 0\nwhile True:\n    open(f'/dev/shm/f{{i}}', 'w').write('a' * (1 << 20))\n    i += 1\n",
        "done",
    ),
}

# What the audit hook of the weak rlimit mode cannot see (no audit event, or a check that races the call): the
# reason that mode runs only when the caller accepts it (`allow_weak`, `rewards.allow_weak_sandbox`).
WEAK_MODE_ESCAPES = {"dir_fd_after_chdir", "mkfifo_outside", "mknod_outside", "setxattr_outside", "shm_open_on_host",
                     "rename_race"}  # fmt: skip
CASES = [(strength, name) for strength in STRENGTHS for name in sorted(HOSTILE)
         if not (strength == "rlimit" and name in WEAK_MODE_ESCAPES)]  # fmt: skip


def _fill(text: str, env: dict) -> str:
    fields = {
        "project": str(PROJECT_FILE),
        "project_line": PROJECT_FILE.read_text().splitlines()[0].strip(),
        "shadow": env["shadow"],
        "canary": env["canary"],
        "dir": env["dir"],
        "port": env["port"],
        "caller": os.getpid(),
        "secret_env": SECRET_ENV,
    }
    return text.format(**fields)


def _xattrs(path: str) -> list[str]:
    try:
        return sorted(os.listxattr(path))
    except OSError:
        return []


def _snapshot(env: dict) -> dict:
    files = [PROJECT_FILE, *sorted((ROOT / "r1engine" / "rewards").glob("*.py")), Path(__file__)]
    return {
        "canary": Path(env["canary"]).read_text() if os.path.exists(env["canary"]) else None,
        "canary_xattrs": _xattrs(env["canary"]),
        "dir": sorted(os.listdir(env["dir"])),
        "mtimes": {str(p): os.stat(p).st_mtime_ns for p in files},
        "connections": env["listener"].connections,
        "host_shm": sorted(glob.glob("/dev/shm/r1-security-*")),
        "host_root": sorted(glob.glob("/pwned") + glob.glob("/dev/pwned")),
    }


def test_suite_is_large_enough():
    assert len(HOSTILE) >= 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("strength", "name"), CASES)
def test_hostile_program_is_contained(env, strength, name):
    program, expected = HOSTILE[name]
    reward = CodeReward(
        time_limit_s=1.0, memory_bytes=256 << 20, max_output_bytes=64 << 10, sandbox=strength, allow_weak_sandbox=True
    )
    before = _snapshot(env)
    t0 = time.monotonic()
    (r,) = reward(
        [f"```python\n{_fill(program, env)}```"], [{"tests": [{"input": "", "output": _fill(expected, env)}]}]
    )
    elapsed = time.monotonic() - t0
    if name == "setsid_escape_then_write":
        time.sleep(1.0)  # the escaped child would write at 1.5 s: give it the chance
    after = _snapshot(env)
    assert r.score == 0.0, f"{name} scored {r.score}"
    assert r.reason, f"{name} has no reason"
    assert elapsed < 8.0, f"{name} took {elapsed:.1f}s"
    assert after == before, f"{name} changed something outside the sandbox: {before} -> {after}"


@pytest.mark.parametrize("strength", STRENGTHS)
def test_nothing_left_behind(env, strength):
    before_dirs = set(glob.glob(os.path.join(tempfile.gettempdir(), "r1sbx-*")))
    lim = SandboxLimits(wall_time_s=1.0, max_output_bytes=4096)
    res = run_python("import time\nprint('hi', flush=True)\ntime.sleep(30)\n", "", lim, strength, allow_weak=True)
    assert res.status == "timeout" and res.stdout == "hi\n"
    leftovers = set(glob.glob(os.path.join(tempfile.gettempdir(), "r1sbx-*"))) - before_dirs
    assert not leftovers
    assert not glob.glob(f"/sys/fs/cgroup/pids/r1engine-sbx-{os.getpid()}-*")
    assert not glob.glob(f"/sys/fs/cgroup/memory/r1engine-sbx-{os.getpid()}-*")
    my_uids = range(200_000 + (os.getpid() % 8192) * 64, 200_000 + (os.getpid() % 8192) * 64 + 64)  # see sandbox
    for _ in range(40):  # an orphan reaped by PID 1 may linger a moment
        ps = subprocess.run(["ps", "-eo", "uid=,args="], capture_output=True, text=True).stdout
        left = [line for line in ps.splitlines() if int(line.split()[0]) in my_uids]
        if not left:
            break
        time.sleep(0.05)
    assert not left


@pytest.mark.parametrize("strength", STRENGTHS)
def test_limits_report_reasons(strength):
    lim = SandboxLimits(wall_time_s=1.0, memory_bytes=128 << 20, max_output_bytes=4096, max_file_bytes=1 << 20)
    assert run_python("print(input()[::-1])", "abc\n", lim, strength, allow_weak=True).stdout == "cba\n"
    assert run_python("while True: pass", "", lim, strength, allow_weak=True).reason.startswith("timeout")
    assert run_python("x = bytearray(1 << 30)", "", lim, strength, allow_weak=True).reason == "killed: memory limit"
    assert run_python("print('x' * 10000)", "", lim, strength, allow_weak=True).reason == "killed: output limit"
    assert run_python("raise SystemExit(3)", "", lim, strength, allow_weak=True).reason.startswith("exit 3")
    big = run_python("open('f', 'w').write('a' * (2 << 20))", "", lim, strength, allow_weak=True)
    assert big.status in ("file size limit", "error") and big.reason


def test_weak_mode_runs_only_when_accepted():
    with pytest.raises(SandboxUnavailable, match="rewards.allow_weak_sandbox"):
        CodeReward(sandbox="rlimit")
    with pytest.raises(SandboxUnavailable, match="dir_fd"):
        run_python("print(1)", strength="rlimit")
    assert run_python("print(1)", strength="rlimit", allow_weak=True).stdout == "1\n"
    # Where the probe settles on the weak mode (here: forced), building the reward says why, instead of running.
    code = "from r1engine.rewards.code import CodeReward\nCodeReward()"
    env = dict(os.environ, R1ENGINE_SANDBOX="rlimit")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "SandboxUnavailable" in out.stderr
    assert "R1ENGINE_SANDBOX=rlimit forces it" in out.stderr and "allow_weak_sandbox" in out.stderr


def _zombie_children() -> list[str]:
    zombies = []
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            text = Path(stat).read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        if fields[0] == "Z" and int(fields[1]) == os.getpid():
            zombies.append(text[text.index("(") + 1 : text.rindex(")")])
    return zombies


# Runs as a non-root user (made here when the tests run as root): a copy of the sandbox module (readable by that
# user wherever the checkout lives), a caller with more threads than the sandbox's process limit, and this process
# as the child subreaper, so that anything a run leaves behind for PID 1 shows up here as a zombie.
NON_ROOT_CHILD = r"""
import ctypes, glob, json, os, sys, threading, time
sys.path.insert(0, sys.argv[1])
from sbx.sandbox import SandboxLimits, SandboxUnavailable, require_sandbox, run_python, sandbox_strength
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
stop = threading.Event()
threads = [threading.Thread(target=stop.wait) for _ in range(24)]
for t in threads:
    t.start()
jobs = json.loads(sys.stdin.read())
out = {"uid": os.getuid(), "strength": sandbox_strength(), "results": {}}
try:
    require_sandbox(None)
except SandboxUnavailable as e:
    out["refused"] = str(e)
else:
    lim = SandboxLimits(wall_time_s=1.0, memory_bytes=256 << 20, max_output_bytes=64 << 10)
    for name, program in jobs.items():
        r = run_python(program, "", lim)
        out["results"][name] = [r.status, r.stdout[-200:], r.reason]
time.sleep(0.3)
zombies = []
for stat in glob.glob("/proc/[0-9]*/stat"):
    try:
        text = open(stat).read()
    except OSError:
        continue
    fields = text[text.rindex(")") + 2:].split()
    if fields[0] == "Z" and int(fields[1]) == os.getpid():
        zombies.append(text[text.index("(") + 1:text.rindex(")")])
out["zombies"] = zombies
stop.set()
print(json.dumps(out))
"""

NON_ROOT_EXTRA = {
    "eight_threads": (
        "import threading\nts = [threading.Thread(target=sum, args=([1],)) for _ in range(8)]\n"
        "[t.start() for t in ts]\n[t.join() for t in ts]\nprint('threads ok')\n"
    ),
    "thread_limit_inside": (
        "import threading, time\nthreading.stack_size(1 << 16)\nn = 0\ntry:\n    for _ in range(100):\n"
        "        threading.Thread(target=time.sleep, args=(0.5,), daemon=True).start()\n        n += 1\n"
        "except RuntimeError:\n    pass\nprint(n)\n"
    ),
}


@pytest.mark.timeout(300)
def test_hostile_suite_as_a_non_root_user(env):
    if not shutil.which("bwrap"):
        pytest.skip("bubblewrap is not installed (optional system package 'bubblewrap')")
    tmp_path = Path(tempfile.mkdtemp(prefix="r1-nonroot-"))  # not under pytest's tmp: its parents are 0700
    pkg = tmp_path / "sbx"
    pkg.mkdir()
    for name in ("sandbox.py", "isolated.py"):
        shutil.copy(ROOT / "r1engine" / "rewards" / name, pkg / name)
    (pkg / "__init__.py").write_text("")
    for p in (tmp_path, pkg, *pkg.iterdir()):
        os.chmod(p, 0o755 if p.is_dir() else 0o644)
    jobs = {name: _fill(program, env) for name, (program, _) in HOSTILE.items()}
    jobs.update(NON_ROOT_EXTRA)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

    def become_nobody() -> None:
        if os.geteuid() == 0:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)

    before = _snapshot(env)
    proc = subprocess.run(
        [python, "-c", NON_ROOT_CHILD, str(tmp_path)], input=json.dumps(jobs), capture_output=True, text=True,
        timeout=280, preexec_fn=become_nobody, cwd=tmp_path, env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    time.sleep(1.0)  # setsid_escape_then_write would write at 1.5 s
    shutil.rmtree(tmp_path, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["uid"] != 0
    assert _snapshot(env) == before
    if out["strength"] != "bubblewrap":
        # bwrap cannot start as this user here (unprivileged user namespaces off): refused, never a silent downgrade
        assert "allow_weak_sandbox" in out["refused"]
        return
    results = out["results"]
    for name, (_, expected) in HOSTILE.items():
        status, stdout, reason = results[name]
        assert stdout.strip() != _fill(expected, env), f"{name} escaped as a non-root user: {results[name]}"
        assert status != "sandbox error", f"{name}: {reason}"
    assert results["fill_disk"][2] and results["fill_dev_shm"][2]  # stopped by a full tmpfs, with a reason
    assert results["eight_threads"][:2] == ["ok", "threads ok\n"]  # the caller's 24 threads do not count
    assert 8 <= int(results["thread_limit_inside"][1]) < 16  # but the sandbox's own limit holds
    assert out["zombies"] == []


def test_runs_leave_no_zombie_for_pid_1():
    if sandbox_strength() != "bubblewrap":
        pytest.skip("bubblewrap is not installed (optional system package 'bubblewrap')")
    code = (
        "import ctypes, json, time\nctypes.CDLL(None).prctl(36, 1, 0, 0, 0)\n"
        "from r1engine.rewards.sandbox import SandboxLimits, run_python\n"
        "for p in ['print(1)'] * 5 + ['import time; time.sleep(10)'] * 2:\n"
        "    run_python(p, '', SandboxLimits(wall_time_s=1.0))\n"
        "time.sleep(0.3)\n"
        "import test_rewards_sandbox_security as t\nprint(json.dumps(t._zombie_children()))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "tests"), str(ROOT)]))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_cli_refuses_the_weak_sandbox_in_one_line(tmp_path):
    env = dict(os.environ, R1ENGINE_SANDBOX="rlimit")
    cmd = [sys.executable, "-m", "r1engine.cli", "train", "rewards.weights={code: 1}", f"output_dir={tmp_path}"]
    out = subprocess.run([*cmd, "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    error = out.stderr.strip().splitlines()[-1]
    assert error.startswith("r1engine: config error: code: refusing") and "rewards.allow_weak_sandbox=true" in error
