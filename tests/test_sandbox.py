"""The sandbox: runaway, memory-hungry, forking and flooding programs are stopped; the caller is unharmed."""

import os
import time

from gpt4.sandbox import Limits, run_python


def test_a_correct_program_passes_and_its_output_comes_back():
    r = run_python("print(sum(range(10)))")
    assert r.status == "passed" and r.passed and r.stdout.strip() == "45"


def test_a_failing_assert_is_reported_with_its_traceback():
    r = run_python("assert 1 + 1 == 3, 'math is broken'")
    assert r.status == "failed" and r.returncode == 1 and "math is broken" in r.stderr


def test_an_infinite_loop_is_killed_at_the_time_limit():
    start = time.perf_counter()
    r = run_python("while True:\n    pass", Limits(timeout_s=3, cpu_s=2))
    assert r.status == "timeout" and not r.passed
    assert time.perf_counter() - start < 10


def test_a_sleeping_program_is_killed_by_the_wall_clock():
    start = time.perf_counter()
    r = run_python("import time\ntime.sleep(60)", Limits(timeout_s=2))
    assert r.status == "timeout" and time.perf_counter() - start < 8


def test_unbounded_allocation_hits_the_memory_limit():
    r = run_python("x = []\nwhile True:\n    x.append(bytearray(10**7))", Limits(memory_mb=256))
    assert r.status == "memory"


def test_forking_is_refused():
    r = run_python("import os\nwhile True:\n    os.fork()")
    assert r.status == "failed" and "BlockingIOError" in r.stderr


def test_output_flood_is_bounded():
    r = run_python("while True:\n    print('x' * 1000)", Limits(timeout_s=5, file_mb=1, output_chars=2000))
    assert not r.passed and len(r.stdout) <= 2100


def test_the_program_runs_isolated_in_a_fresh_directory(tmp_path):
    r = run_python("import os, sys\nprint(os.getcwd())\nprint(sys.flags.isolated)")
    cwd, isolated = r.stdout.split()
    assert cwd != os.getcwd() and "gpt4-sandbox-" in cwd and isolated == "1"
    assert not os.path.exists(cwd)  # removed afterwards


def test_as_root_the_program_cannot_write_the_callers_files(tmp_path):
    target = tmp_path / "victim.txt"
    target.write_text("safe")
    os.chmod(tmp_path, 0o755)
    r = run_python(f"open({str(target)!r}, 'w').write('owned')")
    if os.geteuid() == 0:  # the child dropped to 'nobody' (as a normal user it is that user: nothing to check)
        assert r.status == "failed" and "PermissionError" in r.stderr
        assert target.read_text() == "safe"
