"""Reward hacks against `run_tests`, one per test: each program is wrong and, with the tests
in the same interpreter and namespace as the program, passed. Real bubblewrap runs."""

import pytest

from rewards.code import run_tests

SQRT = ["assert abs(sqrt(16.0) - 4.0) < 1e-6", "assert abs(sqrt(2.25) - 1.5) < 1e-6"]


def hacked(program, tests):
    result = run_tests(program, tests, timeout_s=5)
    return result.passed or result.fraction > 0


def test_an_object_whose_eq_is_always_true_does_not_pass():
    program = ("class Anything:\n    def __eq__(self, other): return True\n"
               "    def __ne__(self, other): return False\n    __hash__ = object.__hash__\n"
               "def add(a, b): return Anything()\n")
    result = run_tests(program, ["assert add(1, 2) == 3"], timeout_s=5)
    assert not result.passed and "not plain data" in result.stderr


@pytest.mark.parametrize("base", ["int", "float"])
def test_a_numeric_subclass_with_rigged_operators_does_not_pass(base):
    program = (f"class R({base}):\n"
               "    __eq__ = __lt__ = __le__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
               "    __sub__ = __rsub__ = lambda s, o: R(0)\n    __abs__ = lambda s: R(0)\n"
               f"    __hash__ = {base}.__hash__\n"
               "def sqrt(x): return R(0)\n")
    assert not hacked(program, SQRT + ["assert sqrt(4.0) == 2.0"])


@pytest.mark.parametrize("program, test", [
    ("def abs(x): return 0\ndef sqrt(x): return 0.0", SQRT[0]),
    ("def all(xs): return True\ndef add(a, b): return 0",
     "assert all(add(a, b) == a + b for a, b in [(1, 2), (3, 4)])"),
    ("def isinstance(x, t): return True\ndef parse(s): return s", "assert isinstance(parse('1'), int)"),
])
def test_a_builtin_shadowed_in_the_programs_namespace_is_not_what_the_tests_see(program, test):
    assert not hacked(program, [test])


@pytest.mark.parametrize("patch", ["abs = lambda x: 0", "all = lambda xs: True"])
def test_a_patched_builtins_module_is_not_what_the_tests_see(patch):
    program = f"import builtins\nbuiltins.{patch}\ndef sqrt(x): return 0.0\n"
    assert not hacked(program, [SQRT[0], "assert all(sqrt(x * x) == x for x in (2.0, 3.0))"])


@pytest.mark.parametrize("patch", [
    "import math\nmath.isclose = lambda *a, **k: True",
    "import sys, types\nsys.modules['math'] = types.SimpleNamespace(isclose=lambda *a, **k: True)",
])
def test_a_patched_standard_module_is_not_what_the_tests_see(patch):
    program = f"{patch}\ndef sqrt(x): return 0.0\n"
    assert not hacked(program, ["import math\nassert math.isclose(sqrt(16.0), 4.0)"])


def test_a_program_cannot_read_the_tests_for_their_expected_values():
    # Every place the tests have been: the test file, stdin (its own, the test process's,
    # the sandbox init's), the test process's memory.
    program = r"""
import os, re
TEXT = ""
for path in ["/sandbox/tests.json", "/dev/stdin", f"/proc/{os.getppid()}/fd/0", "/proc/1/fd/0"]:
    try:
        TEXT += open(path, errors="replace").read()
    except OSError:
        pass
def add(a, b):
    found = re.search(rf"add\({a}, {b}\) == (-?\d+)", TEXT)
    return int(found[1]) if found else 0
"""
    assert not hacked(program, ["assert add(1, 2) == 3", "assert add(20, 22) == 42"])


def test_the_test_process_is_out_of_the_programs_reach():
    # Same uid, but not dumpable: no ptrace, no /proc memory, descriptors or environment.
    program = r"""
import ctypes, os
parent = os.getppid()
for name in ["mem", "environ", "fd/0"]:
    try:
        open(f"/proc/{parent}/{name}", "rb").read(1)
        print("read", name)
    except OSError as err:
        print(type(err).__name__, name)
try:
    os.listdir(f"/proc/{parent}/fd")
    print("listed fd")
except OSError as err:
    print(type(err).__name__, "fd")
libc = ctypes.CDLL(None, use_errno=True)
print("ptrace", libc.ptrace(16, parent, 0, 0), os.strerror(ctypes.get_errno()))  # PTRACE_ATTACH
def add(a, b): return a + b
"""
    result = run_tests(program, ["assert add(1, 2) == 3"], timeout_s=5)
    assert result.passed
    assert result.stdout.splitlines() == ["PermissionError mem", "PermissionError environ", "PermissionError fd/0",
                                          "PermissionError fd", "ptrace -1 Operation not permitted"]


def test_an_honest_program_with_helpers_passes():
    # HumanEval/32's shape: the tests call a helper of the prompt's on the answer; errors the
    # tests expect come back as the same builtin class; plain data of every kind crosses whole.
    program = r"""
import math
def poly(xs, x):
    return sum(c * x ** i for i, c in enumerate(xs))
def find_zero(xs, lo=-10.0, hi=10.0):
    while hi - lo > 1e-12:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if poly(xs, lo) * poly(xs, mid) > 0 else (lo, mid)
    return lo
class NotANumber(ValueError):
    pass
def parse(s):
    if not s.isdigit():
        raise NotANumber(f"not a number: {s}")
    return int(s)
def echo(x):
    print("echo")
    return x
"""
    tests = [
        "assert abs(poly([-6, 11, -6, 1], find_zero([-6, 11, -6, 1]))) < 1e-6",
        "try:\n    parse('x')\nexcept ValueError as err:\n    assert str(err) == 'not a number: x'\n"
        "else:\n    raise AssertionError('no error')",
        "assert parse('42') == 42 and type(parse('42')) is int",
        "try:\n    echo({}, nope=1)\nexcept TypeError as err:\n    assert 'nope' in str(err)",
        "import math\nvalue = {'a': [1, -2.5, (3, None, True)], 4: {5, 6}, b'x': frozenset({1j}), 'big': -2**200}\n"
        "assert echo(value) == value and math.isnan(echo(float('nan'))) and math.copysign(1, echo(-0.0)) == -1\n"
        "assert type(echo((1,))) is tuple and echo('\\udc80') == '\\udc80'",
    ]
    result = run_tests(program, tests, timeout_s=5)
    assert (result.status, result.fraction) == ("passed", 1.0), result.stderr
    assert "echo" in result.stdout  # the program's output is kept


def test_stop_iteration_cannot_end_a_tests_loop_before_its_asserts():
    program = "def add(a, b):\n    raise StopIteration\n"
    test = "for got, want in zip(map(add, [1, 3], [2, 4]), [3, 7]):\n    assert got == want"
    result = run_tests(program, [test], timeout_s=5)
    assert not result.passed and "ProgramError: StopIteration" in result.stderr
