"""Run untrusted Python (model-written programs) in a locked-down process.

The default backend is bubblewrap:
- new network, PID, IPC and UTS namespaces: no network at all (not even the host's loopback);
- the root file system read-only, a private size-limited tmpfs at /tmp (the only writable place),
  home folders, the project folder and the host's /tmp hidden behind empty tmpfs mounts;
- an environment rebuilt from nothing (no WANDB_API_KEY, AWS_*, HF_TOKEN, ...);
- an unprivileged uid (65534) with no capabilities, so RLIMIT_NPROC really bites;
- rlimits: CPU seconds, address space, processes, file size, open files (set by a trusted launcher the
  sandboxed interpreter runs before the program, see ``LAUNCHER``);
- a wall-clock limit after which the whole process group is killed (bwrap's --die-with-parent takes
  the sandbox's PID namespace down with it).

When bubblewrap is missing, a weaker fallback uses ``unshare`` (network and PID namespaces, as root)
plus the same rlimits and uid; it says once, loudly, that it is weaker: the file system stays writable
wherever uid 65534 may write (e.g. /tmp) and readable wherever the world may read.

Output goes to files, not pipes, so a program printing gigabytes is stopped by RLIMIT_FSIZE instead of
filling the grader's memory; only the last ``max_output_kb`` are read back.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from score_ray.config import SandboxConfig

NOBODY = 65534
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
_warned_weak = False


@dataclass
class SandboxResult:
    exit_code: Optional[int]  # None when killed by the wall clock
    stdout: str
    stderr: str
    timed_out: bool
    seconds: float
    backend: str


class SandboxUnavailable(RuntimeError):
    pass


def sandbox_python(choice: str = "auto") -> str:
    """An interpreter the unprivileged uid can execute.

    The system Python is world-readable; an interpreter under /root (pyenv) is not. Programs graded
    here need only the standard library.
    """
    if choice != "auto":
        return choice
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return sys.executable


def choose_backend(choice: str = "auto") -> str:
    global _warned_weak
    has_bwrap = shutil.which("bwrap") is not None
    if choice == "bwrap" and not has_bwrap:
        raise SandboxUnavailable("reward.sandbox.backend=bwrap but bubblewrap is not installed (apt-get install bubblewrap)")
    if choice == "bwrap" or (choice == "auto" and has_bwrap and _bwrap_works()):
        return "bwrap"
    if shutil.which("unshare") is None:
        raise SandboxUnavailable("neither bubblewrap nor unshare is available: model-written code will not be run unsandboxed")
    if not _warned_weak:
        _warned_weak = True
        message = (
            "WARNING: graders use the WEAKER unshare+rlimits sandbox (bubblewrap unavailable or not chosen): "
            "(no read-only root, no hidden home folders). Install bubblewrap for the real sandbox."
        )
        print(message, file=sys.stderr)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return "unshare"


_BWRAP_OK: Optional[bool] = None


def _bwrap_works() -> bool:
    """bwrap can be installed yet unusable (no user namespaces for a non-root user, some containers)."""
    global _BWRAP_OK
    if _BWRAP_OK is None:
        try:
            probe = subprocess.run(
                ["bwrap", "--unshare-net", "--ro-bind", "/", "/", "--dev", "/dev", "true"],
                capture_output=True,
                timeout=20,
            )
            _BWRAP_OK = probe.returncode == 0
        except (OSError, subprocess.TimeoutExpired):
            _BWRAP_OK = False
    return _BWRAP_OK


def _hidden_paths() -> list[str]:
    """Folders that may hold secrets or the project's own files, hidden inside the sandbox."""
    paths = {"/root", "/home", str(_PROJECT_ROOT), os.getcwd(), str(Path.home())}
    return sorted(p for p in paths if p not in ("/", "/tmp", "/usr", "/etc") and os.path.isdir(p))


def _drop_privileges_command() -> list[str]:
    if os.geteuid() != 0:
        return []  # already unprivileged
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all"]


def _bwrap_command(code_dir: str, limits: SandboxConfig) -> list[str]:
    command = [
        "bwrap",
        "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
        "--ro-bind", "/", "/",
        "--dev", "/dev",
        "--proc", "/proc",
    ]
    if os.geteuid() != 0:
        command.insert(1, "--unshare-user")
    for path in _hidden_paths():
        command += ["--tmpfs", path]
    size = str(limits.max_file_mb * 4 * 1024 * 1024)
    command += [
        "--size", size, "--perms", "1777", "--tmpfs", "/tmp",
        "--ro-bind", code_dir, "/tmp/.sandbox",
        "--chdir", "/tmp",
        "--clearenv",
        "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin",
        "--setenv", "HOME", "/tmp",
        "--setenv", "LANG", "C.UTF-8",
        "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
        "--setenv", "PYTHONHASHSEED", "0",
    ]
    return command + _drop_privileges_command()


def _unshare_command() -> list[str]:
    return ["unshare", "--net", "--pid", "--fork", "--kill-child"] + _drop_privileges_command()


def _clean_environment() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}


# Trusted code the sandboxed interpreter runs first: it sets the rlimits (hard = soft, so they cannot be
# raised again; everything the program starts inherits them), then runs ``main`` as __main__. Setting them
# here, as the unprivileged uid, instead of in a preexec_fn between fork and exec of the grader lets Python
# spawn the sandbox with vfork: a fork of a large grader process (a Ray actor) cost more than the sandbox.
LAUNCHER = """\
import resource as r, sys
cpu, memory, processes, size, files, main = sys.argv[1:7]
for kind, soft, hard in ((r.RLIMIT_CPU, int(cpu), int(cpu) + 1), (r.RLIMIT_AS, int(memory), int(memory)),
                         (r.RLIMIT_NPROC, int(processes), int(processes)), (r.RLIMIT_FSIZE, int(size), int(size)),
                         (r.RLIMIT_NOFILE, int(files), int(files)), (r.RLIMIT_CORE, 0, 0)):
    r.setrlimit(kind, (soft, hard))
del r, cpu, memory, processes, size, files, kind, soft, hard
sys.argv = [main]
with open(main) as handle:
    source = handle.read()
exec(compile(source, main, "exec"), {"__name__": "__main__", "__builtins__": __builtins__})
"""


def _launch(python: str, main: str, limits: SandboxConfig) -> list[str]:
    """``python -I -S -c LAUNCHER <limits> main``: the program under its rlimits from its first line."""
    mb = 1024 * 1024
    numbers = (limits.cpu_seconds, limits.memory_mb * mb, limits.max_processes, limits.max_file_mb * mb,
               limits.max_open_files)
    return [python, "-I", "-S", "-c", LAUNCHER, *map(str, numbers), main]


def _tail(path: Path, max_bytes: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_bytes))
        return handle.read().decode("utf-8", errors="replace")


def run_python(
    files: dict[str, str],
    main: str,
    limits: SandboxConfig = SandboxConfig(),
    stdin: str = "",
) -> SandboxResult:
    """Write ``files`` into a fresh folder, run ``python -I main`` on them in the sandbox.

    Inside, the files are at /tmp/.sandbox (read-only) and the working directory is a private /tmp.
    ``stdin`` is fed to the program (the graders pass their per-run secret this way).
    """
    backend = choose_backend(limits.backend)
    python = sandbox_python(limits.python)
    with tempfile.TemporaryDirectory(prefix="score_ray_sandbox_") as work:
        code_dir = Path(work) / "code"
        code_dir.mkdir()
        for name, text in files.items():
            (code_dir / name).write_text(text)
        # World-readable, so uid 65534 can read the code; the parent folder stays private.
        os.chmod(work, 0o711)
        os.chmod(code_dir, 0o755)
        for name in files:
            os.chmod(code_dir / name, 0o644)
        stdout_path, stderr_path, stdin_path = Path(work) / "stdout", Path(work) / "stderr", Path(work) / "stdin"
        stdin_path.write_text(stdin)
        if backend == "bwrap":
            command = _bwrap_command(str(code_dir), limits) + _launch(python, f"/tmp/.sandbox/{main}", limits)
            cwd, env = "/", None
        else:
            command = _unshare_command() + _launch(python, str(code_dir / main), limits)
            cwd, env = str(code_dir), _clean_environment()
        start = time.monotonic()
        with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err, open(stdin_path, "rb") as inp:
            process = subprocess.Popen(
                command,
                stdin=inp,
                stdout=out,
                stderr=err,
                cwd=cwd,
                env=env if env is not None else _clean_environment(),
                start_new_session=True,  # our own process group, killed whole on timeout
                close_fds=True,
            )
            exit_code = _wait(process, limits.wall_seconds)
            timed_out = exit_code is None
            if timed_out:
                _kill_group(process)
        seconds = time.monotonic() - start
        max_bytes = limits.max_output_kb * 1024
        return SandboxResult(
            exit_code=exit_code,
            stdout=_tail(stdout_path, max_bytes),
            stderr=_tail(stderr_path, max_bytes),
            timed_out=timed_out,
            seconds=seconds,
            backend=backend,
        )


def _wait(process: subprocess.Popen, timeout_s: float) -> Optional[int]:
    """The exit code, or None after ``timeout_s``. Waits on a pidfd, which wakes the moment the process
    ends: ``Popen.wait(timeout)`` polls with sleeps that double up to 50 ms, idling a grader thread for
    up to that long after every program."""
    try:
        handle = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # no pidfd (old kernel): the polling wait
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None
    try:
        ready, _, _ = select.select([handle], [], [], timeout_s)
    finally:
        os.close(handle)
    return process.wait() if ready else None


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:  # pragma: no cover - a process that ignores SIGKILL is a kernel problem
        pass
