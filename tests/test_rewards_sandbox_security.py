"""Security suite: hostile programs run through the code reward must be contained.

For every program and every sandbox strength available here: the caller survives and returns within a
bound, the reward is 0 with a reason, a canary file outside the sandbox and the project's files are
unchanged, no connection reaches a listener on 127.0.0.1, no sandbox process or cgroup is left behind.
Read attacks use the secret itself as the test's expected output, so a leak would score 1.0.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from r1engine.rewards.code import CodeReward
from r1engine.rewards.sandbox import SandboxLimits, run_python, sandbox_strength

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
}


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


def _snapshot(env: dict) -> dict:
    files = [PROJECT_FILE, *sorted((ROOT / "r1engine" / "rewards").glob("*.py")), Path(__file__)]
    return {
        "canary": Path(env["canary"]).read_text() if os.path.exists(env["canary"]) else None,
        "dir": sorted(os.listdir(env["dir"])),
        "mtimes": {str(p): os.stat(p).st_mtime_ns for p in files},
        "connections": env["listener"].connections,
    }


def test_suite_is_large_enough():
    assert len(HOSTILE) >= 20


@pytest.mark.timeout(60)
@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_program_is_contained(env, strength, name):
    program, expected = HOSTILE[name]
    reward = CodeReward(time_limit_s=1.0, memory_bytes=256 << 20, max_output_bytes=64 << 10, sandbox=strength)
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
    res = run_python("import time\nprint('hi', flush=True)\ntime.sleep(30)\n", "", lim, strength)
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
    assert run_python("print(input()[::-1])", "abc\n", lim, strength).stdout == "cba\n"
    assert run_python("while True: pass", "", lim, strength).reason.startswith("timeout")
    assert run_python("x = bytearray(1 << 30)", "", lim, strength).reason == "killed: memory limit"
    assert run_python("print('x' * 10000)", "", lim, strength).reason == "killed: output limit"
    assert run_python("raise SystemExit(3)", "", lim, strength).reason.startswith("exit 3")
    big = run_python("open('f', 'w').write('a' * (2 << 20))", "", lim, strength)
    assert big.status in ("file size limit", "error") and big.reason
