"""Code grader and sandbox: HumanEval references pass, broken ones fail, attacks are contained."""

import os
import random
import socket
import threading
import time

import pytest

from score_ray.config import HumanEvalSource, RewardConfig
from score_ray.data import load_problems
from score_ray.reward import Grader, GradeRequest
from score_ray.reward.code import extract_program, grade_code
from score_ray.config import SandboxConfig
from score_ray.reward.sandbox import choose_backend, run_python

LIMITS = SandboxConfig(wall_seconds=5.0, cpu_seconds=4, memory_mb=512)


def requests(records):
    return [GradeRequest.from_record(record) for record in records]
ASSERTS = ["assert add(2, 3) == 5", "assert add(-1, 1) == 0"]
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"


def humaneval_records():
    problems, _ = load_problems(HumanEvalSource(type="humaneval"))
    records = []
    for problem in problems:
        stub = problem.prompt.split("```python\n", 1)[1].rsplit("\n```", 1)[0]
        records.append({"id": problem.id, "kind": "code", "response": f"```python\n{stub}\n{problem.solution}```",
                        "tests": problem.tests, "entry_point": problem.entry_point, "stub": stub})
    return records


def test_the_real_sandbox_is_in_use():
    assert choose_backend("auto") == "bwrap", "bubblewrap should be installed by make setup"


def test_all_164_humaneval_references_pass_and_broken_ones_fail():
    records = humaneval_records()
    grader = Grader(RewardConfig(sandbox=LIMITS, threads_per_worker=2))
    results = grader.grade(requests(records))
    failed = [(r["id"], res.detail) for r, res in zip(records, results) if res.status != "correct"]
    assert not failed, failed
    # Broken variants of a sample: the body replaced by a wrong constant return.
    sample = random.Random(0).sample(records, 30)
    broken = [{**r, "response": f"```python\n{r['stub']}\n    return None\n```"} for r in sample]
    results = grader.grade(requests(broken))
    grader.close()
    assert all(res.status == "wrong" and res.reward == 0.0 for res in results), results


def test_mbpp_style_assert_list_and_string_tests():
    assert grade_code(GOOD, ASSERTS, limits=LIMITS).status == "correct"
    assert grade_code(GOOD, "\n".join(ASSERTS), limits=LIMITS).status == "correct"
    wrong = grade_code(GOOD.replace("a + b", "a - b"), ASSERTS, limits=LIMITS)
    assert wrong.status == "wrong" and "AssertionError" in wrong.detail


def test_program_extraction():
    assert extract_program("text\n```python\nx = 1\n```\nmore\n```python\nx = 2\n```") == "x = 2\n"
    assert extract_program("[BEGIN]\ndef f(): pass\n[DONE]") == "def f(): pass\n"
    assert extract_program("```python\ndef f():\n    return 1") == "def f():\n    return 1"
    assert extract_program("def f(): return 1") == "def f(): return 1"


# ----------------------------------------------------------------------------- the adversarial battery


@pytest.mark.parametrize(
    "name, program",
    [
        ("sys.exit(0)", "import sys\nsys.exit(0)\ndef add(a, b): return a + b"),
        ("os._exit(0)", "import os\nos._exit(0)"),
        ("atexit exits 0", "import atexit, os\natexit.register(lambda: os._exit(0))\ndef add(a, b): return a - b"),
        ("exit in the tested function", "import sys\ndef add(a, b):\n    sys.exit(0)"),
        ("fake success markers", "print('ALL TESTS PASSED')\nprint('ok')\nimport sys\nprint('0' * 32)\nsys.exit(0)"),
        ("raise SystemExit from tests", "def add(a, b):\n    raise SystemExit(0)"),
        ("KeyboardInterrupt", "def add(a, b):\n    raise KeyboardInterrupt"),
    ],
)
def test_exit_and_marker_tricks_do_not_pass(name, program):
    result = grade_code(f"```python\n{program}\n```", ASSERTS, limits=LIMITS)
    assert result.reward == 0.0 and result.status == "wrong", (name, result)


def test_endless_loop_is_killed_on_time():
    start = time.monotonic()
    result = grade_code("```python\nwhile True:\n    pass\n```", ASSERTS, limits=SandboxConfig(wall_seconds=2.0, cpu_seconds=30))
    assert result.status == "timeout" and result.reward == 0.0
    assert time.monotonic() - start < 6


def test_sleeping_program_is_killed_by_the_wall_clock():
    result = grade_code("```python\nimport time\ntime.sleep(60)\n```", ASSERTS, limits=SandboxConfig(wall_seconds=1.5))
    assert result.status == "timeout"


def _count_nobody_processes() -> int:
    count = 0
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                if os.stat(f"/proc/{pid}").st_uid == 65534:
                    count += 1
            except FileNotFoundError:
                pass
    return count


def test_fork_bomb_is_contained_and_leaves_no_process():
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = grade_code(f"```python\n{bomb}\n```", ASSERTS, limits=SandboxConfig(wall_seconds=3.0, max_processes=32))
    assert result.reward == 0.0 and result.status in ("timeout", "wrong")
    time.sleep(0.5)
    assert _count_nobody_processes() == 0
    assert grade_code(GOOD, ASSERTS, limits=LIMITS).status == "correct"


def test_memory_bomb_is_stopped_by_the_address_space_limit():
    result = grade_code("```python\nx = bytearray(8 * 1024**3)\n```", ASSERTS, limits=LIMITS)
    assert result.status == "wrong" and "MemoryError" in result.detail


def test_no_network_even_to_a_local_listener():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    accepted = []
    server.settimeout(4)

    def accept():
        try:
            accepted.append(server.accept())
        except OSError:
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    program = (
        "import socket\ndef add(a, b):\n    return a + b\n"
        f"socket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'leak')\n"
    )
    result = grade_code(f"```python\n{program}\n```", ASSERTS, limits=LIMITS)
    thread.join()
    server.close()
    assert result.status == "wrong" and ("ConnectionRefused" in result.detail or "OSError" in result.detail)
    assert not accepted, "the sandboxed program reached a listener on the host"


def test_writing_outside_the_sandbox_changes_nothing_on_the_host(tmp_path):
    target = tmp_path / "pwned.txt"
    os.chmod(tmp_path, 0o777)  # even a world-writable host folder must stay untouched
    program = (
        "import os\n"
        f"for path in [{str(target)!r}, '/etc/pwned', '/root/pwned', '/tmp/host_pwned', {str(os.getcwd() + '/pwned')!r}]:\n"
        "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
        "def add(a, b):\n    return a + b\n"
    )
    result = grade_code(f"```python\n{program}\n```", ASSERTS, limits=LIMITS)
    assert result.status == "correct"  # the program ran; its writes went nowhere that lasts
    for path in (target, "/etc/pwned", "/root/pwned", "/tmp/host_pwned", os.path.join(os.getcwd(), "pwned")):
        assert not os.path.exists(path), path


def test_credentials_and_home_folders_are_invisible(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "secret-wandb")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-aws")
    monkeypatch.setenv("HF_TOKEN", "secret-hf")
    program = (
        "import os, glob\n"
        "print(sorted(k for k in os.environ))\n"
        "print(glob.glob('/root/*') + glob.glob('/root/.*') + glob.glob('/home/*'))\n"
        "print(os.getuid())\n"
    )
    result = run_python({"m.py": program}, "m.py", LIMITS)
    assert result.exit_code == 0, result.stderr
    env_line, home_line, uid_line = result.stdout.strip().splitlines()
    assert "WANDB" not in env_line and "AWS" not in env_line and "HF_TOKEN" not in env_line
    assert home_line == "[]"
    assert uid_line == "65534"


def test_killing_the_parent_process_fails_and_the_grader_lives_on():
    program = (
        "import os, signal\n"
        f"targets = [os.getppid(), 1, {os.getpid()}]\n"
        "for pid in targets:\n"
        "    try:\n        os.kill(pid, signal.SIGKILL)\n        print(pid, 'killed')\n"
        "    except OSError as err:\n        print(pid, type(err).__name__)\n"
    )
    result = run_python({"m.py": program}, "m.py", LIMITS)
    lines = result.stdout.strip().splitlines()
    # The sandbox's parent and init belong to root, and the grader's pid does not exist in its PID namespace.
    assert len(lines) == 3 and not any(line.endswith("killed") for line in lines), lines
    assert os.getpid() > 0  # this process, the grader, is still here
    attack = f"```python\n{program}\ndef add(a, b):\n    return a + b\n```"
    assert grade_code(attack, ASSERTS, limits=LIMITS).status == "correct"  # contained; graded on its tests
    assert grade_code(GOOD.replace("a + b", "a * b"), ASSERTS, limits=LIMITS).status == "wrong"


def test_huge_output_is_cut_and_does_not_exhaust_the_grader():
    program = "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)\n"
    result = run_python({"m.py": program}, "m.py", SandboxConfig(wall_seconds=5, max_file_mb=4, max_output_kb=16))
    assert not result.timed_out and result.exit_code != 0  # stopped by the file-size limit
    assert len(result.stdout) <= 16 * 1024
    graded = grade_code(f"```python\n{program}\n```", ASSERTS, limits=SandboxConfig(wall_seconds=5, max_file_mb=4))
    assert graded.reward == 0.0


def test_grader_reports_bad_records_as_errors():
    grader = Grader(RewardConfig(sandbox=LIMITS, threads_per_worker=1))
    results = grader.grade(requests([
        {"kind": "code", "response": GOOD},
        {"kind": "math", "response": "\\boxed{1}"},
        {"kind": "poem", "response": "x"},
    ]))
    grader.close()
    assert [r.status for r in results] == ["error", "error", "error"]
    assert "'tests'" in results[0].detail and "'answer'" in results[1].detail and "'kind'" in results[2].detail


def test_the_reward_package_does_not_import_torch():
    import subprocess
    import sys

    probe = "import sys, score_ray.reward, score_ray.grade; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_the_weaker_fallback_still_isolates_network_uid_and_environment(monkeypatch, capsys):
    import score_ray.reward.sandbox as sandbox

    monkeypatch.setattr(sandbox, "_warned_weak", False)
    monkeypatch.setenv("WANDB_API_KEY", "secret")
    program = (
        "import os, socket\nprint(os.getuid())\n"
        "try:\n    socket.create_connection(('127.0.0.1', 22), timeout=1)\n    print('network')\n"
        "except OSError:\n    print('no network')\n"
        "print(sorted(os.environ))\n"
    )
    with pytest.warns(RuntimeWarning, match="WEAKER"):
        result = run_python({"m.py": program}, "m.py", SandboxConfig(backend="unshare"))
    assert result.backend == "unshare" and result.exit_code == 0, result.stderr
    uid, network, environment = result.stdout.strip().splitlines()
    assert uid == "65534" and network == "no network" and "WANDB_API_KEY" not in environment
    assert "WEAKER" in capsys.readouterr().err
    assert grade_code(GOOD, ASSERTS, limits=SandboxConfig(backend="unshare")).status == "correct"


def test_a_program_cut_at_the_token_cap_is_not_run():
    # the function is whole and would pass: what the cap cut (here a comment) was never seen, so it fails closed
    record = {"kind": "code", "response": GOOD.removesuffix("```") + "# now a test of", "tests": ["assert add(2, 3) == 5"]}
    grader = Grader(RewardConfig(sandbox=LIMITS, threads_per_worker=1))
    whole, cut = grader.grade(requests([record, {**record, "truncated": True}]))
    grader.close()
    assert whole.status == "correct"
    assert cut.status == "wrong" and cut.reward == 0.0 and "token cap" in cut.detail
