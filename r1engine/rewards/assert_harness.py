"""Run assert-style tests (HumanEval ``check(candidate)``, MBPP ``assert f(x) == y``) of an untrusted program.

One sandboxed process per program (:func:`r1engine.rewards.sandbox.run_python`, its limits and isolation)
runs :data:`HARNESS`, a fixed script that receives the program, the tests and a per-run random nonce as
JSON on stdin. It runs the program's top-level code in its own module, then each test in a fresh
namespace, and writes ``PREFIX + nonce + ":PASS"`` only when every test ran without an exception.

Threat model: the program is written to score, not to escape (escaping is the sandbox's job). Defended:

- printing the success marker: the nonce is only on stdin, in no file the program can read;
- reading the tests or the nonce: the harness reads all of stdin first, then points fd 0 at /dev/null;
- exiting with status 0 early (``sys.exit``, ``os._exit``, ``raise SystemExit``, at top level or inside the
  function): no marker, so the exit status means nothing;
- patching (``abs``, ``print``, ``sys.stdout``, ``sys.exit``, ``math.isclose``, a global named like a builtin
  or a module): after the top-level code, every module loaded before it (builtins, sys, os, the common test
  imports) is restored from a snapshot; the tests get a private copy of the pristine builtins, and neither a
  program global that shadows a builtin (unless it is the entry point) nor a stand-in for a snapshotted
  module they use; the harness only calls functions it bound before the program ran, and writes the marker
  to a copy of fd 1 it made then.

Not defended (the program shares the interpreter): deliberate introspection (frames up to the harness,
``gc.get_objects()``, ``/proc/self/mem``) finds the nonce and the tests; patches made while the tests run
(from inside the function, or by a thread, finalizer or signal handler left behind) reach the modules the
tests use, though not their builtins; a returned object whose ``__eq__`` is always True passes
``assert f(x) == y``; attributes of classes (``collections.Counter.__eq__``) are not snapshotted.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

from .sandbox import SandboxLimits, SandboxResult, run_python

PREFIX = "@@r1engine-assert-harness:"

# Runs inside the sandbox under the sandbox's interpreter (keep it plain Python 3.8+). Everything it uses
# after the program ran is bound to a local of _main() first; the nonce lives only in _main's frame.
HARNESS = r"""
import builtins, json, os, signal, sys
for _name in ("math", "re", "string", "random", "collections", "itertools", "functools", "heapq", "bisect",
              "copy", "typing", "operator", "hashlib"):
    try:
        __import__(_name)  # so that a patch of them by the program is undone (they are snapshotted)
    except Exception:
        pass


def _main(PREFIX):
    read, write, os_open, dup, dup2, close, exit_ = os.read, os.write, os.open, os.dup, os.dup2, os.close, os._exit
    BaseExc, ModuleType = BaseException, type(sys)
    compile_, exec_, type_, str_, repr_, isinstance_ = compile, exec, type, str, repr, isinstance
    enumerate_, len_, list_, dict_ = enumerate, len, list, dict
    settrace, setprofile, modules = sys.settrace, sys.setprofile, sys.modules
    setitimer, set_handler, ITIMER_REAL, SIGALRM = signal.setitimer, signal.signal, signal.ITIMER_REAL, signal.SIGALRM

    class TestTimeout(BaseException):  # not an Exception: `except Exception` in the program does not swallow it
        pass

    def on_alarm(signum, frame):
        raise TestTimeout()

    def limit(seconds):
        # Per piece (the program's top level, each test): a loop in one test ends that test, not the whole
        # run. The program can defeat this (block or catch the signal); the sandbox's wall limit still holds.
        set_handler(SIGALRM, on_alarm)
        setitimer(ITIMER_REAL, seconds)

    chunks = []
    while True:
        b = read(0, 1 << 16)
        if not b:
            break
        chunks.append(b)
    job = json.loads(b"".join(chunks).decode("utf-8"))
    del chunks
    nonce = job["nonce"]
    null = os_open(os.devnull, os.O_RDONLY)
    dup2(null, 0)
    close(null)
    out = dup(1)

    def report(status):
        write(out, ("\n" + PREFIX + nonce + ":" + status.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        exit_(0)

    def describe(e, source=None, filename=None):
        try:
            name = type_(e).__name__
            msg = str_(e)
            text = name + ": " + msg if msg else name
            if source is not None:
                line, tb = None, e.__traceback__
                while tb is not None:
                    if tb.tb_frame.f_code.co_filename == filename:
                        line = tb.tb_lineno
                    tb = tb.tb_next
                lines = source.splitlines()
                if line is not None and 0 < line <= len_(lines):
                    text += " at `" + lines[line - 1].strip() + "`"
            return text[:300]
        except BaseExc:
            return "an exception that cannot be described"

    snapshot = [(n, m, dict_(m.__dict__)) for n, m in list_(modules.items()) if isinstance_(m, ModuleType)]
    known_modules = {n: m for n, m, _ in snapshot}
    pristine = dict_(builtins.__dict__)
    paths = [(lst, list_(lst)) for lst in (sys.meta_path, sys.path_hooks, sys.path)]

    def restore():
        settrace(None)
        setprofile(None)
        for n, m, saved in snapshot:
            modules[n] = m
            d = m.__dict__
            for k in list_(d):
                if k not in saved and not (isinstance_(d[k], ModuleType) and modules.get(n + "." + k) is d[k]):
                    del d[k]  # (a submodule the program imported stays an attribute of its package)
            d.update(saved)
        for lst, saved in paths:
            lst[:] = saved

    try:
        code = compile_(job["program"], "<solution>", "exec", dont_inherit=True)
    except BaseExc as e:
        report("FAIL:the solution does not compile: " + describe(e))
    solution = ModuleType("__solution__")  # a real module (pickle, dataclasses), not __main__ (demo blocks)
    modules["__solution__"] = solution
    g = solution.__dict__
    g["__builtins__"] = builtins
    error = None
    per_test = job["time_limit_s"]
    try:
        limit(per_test)
        exec_(code, g)
    except TestTimeout:
        error = "timeout"
    except BaseExc as e:
        error = e
    limit(0)
    restore()
    if error == "timeout":
        report("FAIL:the solution's top-level code timed out")
    if error is not None:
        report("FAIL:the solution raised at import: " + describe(error))

    ns = {"__name__": "__tests__", "__builtins__": dict_(pristine)}
    test_text = job["setup"] + "\n".join(job["tests"])
    for k, v in list_(g.items()):
        if type_(k) is not str_ or k.startswith("__") or k in pristine:
            continue  # a global that shadows a builtin would shadow it for the tests too
        if k in known_modules and v is not known_modules[k] and k + "." in test_text:
            continue  # a stand-in for a module the tests use (`class math: isclose = ...`)
        ns[k] = v
    entry = job["entry_point"]
    if entry is not None and entry not in g:
        report("FAIL:the solution does not define " + repr_(entry))
    if job["setup"]:
        try:
            exec_(compile_(job["setup"], "<setup>", "exec", dont_inherit=True), ns)
        except BaseExc as e:
            report("FAIL:test setup failed: " + describe(e, job["setup"], "<setup>"))
    if entry is not None:
        ns[entry] = g[entry]
    tests = job["tests"]
    for k, source in enumerate_(tests):
        filename = "<test %d>" % k
        label = "test" if len_(tests) == 1 else "test %d" % k
        try:
            limit(per_test)
            exec_(compile_(source, filename, "exec", dont_inherit=True), ns)
            limit(0)
        except TestTimeout:
            limit(0)
            report("FAIL:" + label + ": timeout")
        except BaseExc as e:
            limit(0)
            report("FAIL:" + label + " failed: " + describe(e, source, filename))
    report("PASS")


_main(PREFIX_VALUE)
""".replace("PREFIX_VALUE", repr(PREFIX))


@dataclass(frozen=True)
class AssertOutcome:
    """``passed``: the harness wrote this run's success marker; ``reason``: why not; ``sandbox``: the raw run."""

    passed: bool
    reason: str | None
    sandbox: SandboxResult


def harness_payload(
    program: str,
    tests: Sequence[str],
    nonce: str,
    setup: str = "",
    entry_point: str | None = None,
    time_limit_s: float = 0.0,
) -> str:
    """The JSON text the harness reads from stdin (``time_limit_s``: per test and for the top level, 0: none)."""
    job = {"nonce": nonce, "program": program, "tests": list(tests), "setup": setup, "entry_point": entry_point}
    job["time_limit_s"] = float(time_limit_s)
    return json.dumps(job)


def run_assert_tests(
    program: str,
    tests: Sequence[str],
    setup: str = "",
    entry_point: str | None = None,
    limits: SandboxLimits | None = None,
    strength: str | None = None,
    time_limit_s: float | None = None,
    allow_weak: bool = False,
) -> AssertOutcome:
    """Run ``program`` then ``setup`` and each of ``tests`` (Python sources, trusted) in one sandboxed process.

    Args:
        program: the untrusted program (its top-level code runs first, in module ``__solution__``).
        tests: test sources, each run in order in the tests' namespace; the first exception fails the run.
        setup: trusted source run in the tests' namespace before the tests (imports, helpers, a prompt).
        entry_point: a name the program must define; bound in the tests' namespace after ``setup``.
        limits: sandbox limits for the whole run (its wall time bounds everything).
        strength: force "bubblewrap" or "rlimit" (default: the sandbox's choice).
        time_limit_s: limit for the program's top-level code and for each test (None: only the run's limit).
        allow_weak: accept the weaker rlimit sandbox (see :func:`r1engine.rewards.sandbox.run_python`).
    """
    if not isinstance(program, str):
        raise TypeError(f"run_assert_tests: program must be a str, got {type(program).__name__}")
    if isinstance(tests, str) or not all(isinstance(t, str) for t in tests):
        raise TypeError(f"run_assert_tests: tests must be a sequence of str, got {str(tests)[:120]!r}")
    if not isinstance(setup, str):
        raise TypeError(f"run_assert_tests: setup must be a str, got {type(setup).__name__}")
    if entry_point is not None and (not isinstance(entry_point, str) or not entry_point.isidentifier()):
        raise ValueError(f"run_assert_tests: entry_point must be an identifier, got {entry_point!r}")
    nonce = secrets.token_hex(16)
    payload = harness_payload(program, tests, nonce, setup, entry_point, time_limit_s or 0.0)
    res = run_python(HARNESS, payload, limits, strength, allow_weak=allow_weak)
    mine = PREFIX + nonce + ":"
    for line in res.stdout.splitlines():
        if line.startswith(mine):
            status = line[len(mine) :]
            if status == "PASS" and res.status == "ok":
                return AssertOutcome(True, None, res)
            if status.startswith("FAIL:"):
                return AssertOutcome(False, status[len("FAIL:") :], res)
    if res.status == "ok":
        return AssertOutcome(False, "exited before the tests finished (exit status 0)", res)
    return AssertOutcome(False, res.reason or res.status, res)
