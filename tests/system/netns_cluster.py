"""A Ray cluster of several hosts on this one machine, for tests of what crosses the network.

Each host is a Linux network namespace with its own TEST-NET-1 address (192.0.2.0/24, used only
inside the namespaces made here), joined to the others by veth pairs on a bridge that lives in a
namespace of its own (nothing is added to the machine's own network). A host's processes also get
their own mount, UTS and PID namespaces: a private /tmp and /dev/shm (Ray's session folder, object
store and the job's working_dir copy differ per host, as on a real cluster) and its own host name.
Everything else on the disk is shared, like an image and /mnt/shared on a cloud cluster.

Killing a host's first process (``Host.kill``) ends every process of that host at once: the kernel
kills a PID namespace's members when its init dies, which is what a lost spot node looks like.

Needs root and ``ip`` (iproute2) and ``unshare``/``nsenter`` (util-linux); ``available()`` says why not.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

SUBNET = "192.0.2"  # TEST-NET-1 (RFC 5737): documentation addresses, routed nowhere
RAY = str(Path(sys.executable).with_name("ray"))


def available() -> Optional[str]:
    """None when hosts can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "unshare", "nsenter"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (iproute2 / util-linux)"
    probe = f"srprobe{os.getpid() % 100000}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _ip(*args: str) -> None:
    result = subprocess.run(["ip", *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {result.stderr.strip()}")


@dataclass
class Host:
    name: str  # also its network namespace
    address: str
    log: Path
    process: Optional[subprocess.Popen] = None
    init_pid: Optional[int] = None  # the host's PID-namespace init, as this machine sees it

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def run(self, args: list[str], env: dict, timeout: float, **kwargs) -> subprocess.CompletedProcess:
        """Run a command on this host (its network, /tmp and PID namespaces), as a user logged in there."""
        if self.init_pid is None:
            raise RuntimeError(f"host {self.name} is not running")
        enter = ["nsenter", f"--target={self.init_pid}", "--mount", "--net", "--uts", "--pid", "--"]
        return subprocess.run(enter + args, env=env, capture_output=True, text=True, timeout=timeout, **kwargs)

    def kill(self) -> None:
        """SIGKILL the host's init: every process of the host dies with it (a lost node)."""
        if self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
        self.init_pid = None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Cluster:
    """Hosts on one bridge; ``head`` runs Ray's head with no CPUs for actors (as the cluster files do)."""

    prefix: str
    workdir: Path  # logs; outside every host's private /tmp
    env: dict
    hosts: dict[str, Host] = field(default_factory=dict)
    switch: str = ""
    next_octet: int = 101
    dashboard_port: int = 8265
    gcs_port: int = 6379
    keep_visible: list[Path] = field(default_factory=list)  # folders under /tmp every host must still see

    @classmethod
    def create(cls, workdir: Path, env: dict, keep_visible: Optional[list[Path]] = None) -> "Cluster":
        if str(workdir.resolve()).startswith("/tmp/"):
            raise ValueError(f"{workdir}: the cluster's shared folder must not be under /tmp (each host has its own)")
        prefix = f"sr{os.getpid() % 100000}"
        cluster = cls(prefix=prefix, workdir=workdir, env=env, switch=f"{prefix}-sw",
                      keep_visible=[Path(p).resolve() for p in keep_visible or []])
        _ip("netns", "add", cluster.switch)
        _ip("-n", cluster.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", cluster.switch, "link", "set", "br0", "up")
        return cluster

    @property
    def head(self) -> Host:
        return self.hosts["head"]

    @property
    def dashboard(self) -> str:
        return f"http://{self.head.address}:{self.dashboard_port}"

    def _add_namespace(self, role: str) -> Host:
        index = len(self.hosts)
        name = f"{self.prefix}-{role}"
        address = f"{SUBNET}.{self.next_octet}"
        self.next_octet += 1
        inner, outer = f"{self.prefix}i{index}", f"{self.prefix}o{index}"
        _ip("netns", "add", name)
        _ip("link", "add", inner, "type", "veth", "peer", "name", outer)
        _ip("link", "set", inner, "netns", name)
        _ip("link", "set", outer, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", outer, "master", "br0")
        _ip("-n", self.switch, "link", "set", outer, "up")
        _ip("-n", name, "link", "set", inner, "name", "eth0")
        _ip("-n", name, "addr", "add", f"{address}/24", "dev", "eth0")
        _ip("-n", name, "link", "set", "eth0", "up")
        _ip("-n", name, "link", "set", "lo", "up")
        host = Host(name=name, address=address, log=self.workdir / f"{role}.log")
        self.hosts[role] = host
        return host

    def start_host(self, role: str, ray_args: list[str], timeout: float = 180) -> Host:
        """Make a host and start ``ray start --block`` on it; returns once its init process is known."""
        host = self._add_namespace(role)
        # Inside: a private /tmp and /dev/shm, a host name, then Ray. exec keeps Ray as the namespace's init.
        # What must stay visible under /tmp (a checkout and its venv there, as in CI's clone) is bound back
        # over the new /tmp through a holding mount point (made only in this host's mount namespace).
        under_tmp = [path for path in self.keep_visible if str(path).startswith("/tmp/")]
        keep = [path for path in under_tmp if not any(other in path.parents for other in under_tmp)]
        hold = self.workdir / f"hold-{role}"
        steps = []
        for index, path in enumerate(keep):
            (hold / str(index)).mkdir(parents=True, exist_ok=True)
            steps.append(f"mount --bind '{path}' '{hold / str(index)}'")
        steps += ["mount -t tmpfs -o size=6g tmpfs /tmp", "mount -t tmpfs -o size=2g tmpfs /dev/shm"]
        for index, path in enumerate(keep):
            steps.append(f"mkdir -p '{path}' && mount --bind '{hold / str(index)}' '{path}'")
        inside = (
            " && ".join(steps) + f" && hostname {role} && exec {RAY} start --block --disable-usage-stats "
            f"--node-ip-address={host.address} " + " ".join(f"'{arg}'" for arg in ray_args)
        )
        log = open(host.log, "w")
        host.process = subprocess.Popen(
            ["ip", "netns", "exec", host.name, "unshare", "--mount", "--uts", "--pid", "--fork", "--mount-proc",
             "--propagation", "private", "sh", "-c", inside],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while host.init_pid is None:
            try:
                children = _children(host.process.pid)
            except FileNotFoundError:
                children = []
            if children:
                host.init_pid = children[0]
            elif host.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"host {role} did not start:\n{host.log_tail()}")
            else:
                time.sleep(0.1)
        return host

    def start_head(self) -> Host:
        return self.start_host("head", [
            "--head", f"--port={self.gcs_port}", "--num-cpus=0", "--num-gpus=0", "--dashboard-host=0.0.0.0",
            f"--dashboard-port={self.dashboard_port}", "--object-store-memory=300000000",
        ])

    def start_worker(self, role: str, cpus: int, resources: dict[str, float]) -> Host:
        return self.start_host(role, [
            f"--address={self.head.address}:{self.gcs_port}", f"--num-cpus={cpus}", "--num-gpus=0",
            f"--resources={json.dumps(resources)}", "--object-store-memory=300000000",
        ])

    def alive_nodes(self) -> list[dict]:
        """Ray's view of the live nodes, asked from the head."""
        script = ("import json, ray; ray.init(address='auto', log_to_driver=False); "
                  "print('NODES=' + json.dumps([{'ip': n['NodeManagerAddress'], 'resources': n['Resources']} "
                  "for n in ray.nodes() if n['Alive']]))")
        result = self.head.run([sys.executable, "-c", script], env=self.env, timeout=120)
        for line in result.stdout.splitlines():
            if line.startswith("NODES="):
                return json.loads(line[len("NODES="):])
        raise RuntimeError(f"could not list the cluster's nodes: {result.stderr[-2000:]}")

    def wait_for_nodes(self, addresses: set[str], timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for role, host in self.hosts.items():
                if host.init_pid is not None and not host.alive():
                    raise RuntimeError(f"host {role} died while starting:\n{host.log_tail()}")
            try:
                seen = {node["ip"] for node in self.alive_nodes()}
            except (RuntimeError, subprocess.TimeoutExpired):
                seen = set()
            if addresses <= seen:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {r}:\n{h.log_tail(1500)}" for r, h in self.hosts.items())
                raise RuntimeError(f"nodes {sorted(addresses - seen)} did not join within {timeout:.0f}s\n{logs}")
            time.sleep(2)

    def submit(self, args: list[str], working_dir: Path, timeout: float) -> subprocess.CompletedProcess:
        """``ray job submit --working-dir`` from the head host, as a user does on a cluster."""
        command = [RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
                   sys.executable, "-m", "score_ray.launch", *args]
        return self.head.run(command, env=self.env, timeout=timeout, cwd=working_dir)

    def start_submit(self, args: list[str], working_dir: Path, log: Path) -> subprocess.Popen:
        """``submit`` without waiting (the caller kills a host while it runs); output goes to ``log``."""
        command = ["nsenter", f"--target={self.head.init_pid}", "--mount", "--net", "--uts", "--pid", "--",
                   RAY, "job", "submit", "--address", self.dashboard, "--working-dir", str(working_dir), "--",
                   sys.executable, "-m", "score_ray.launch", *args]
        with open(log, "w") as out:
            return subprocess.Popen(command, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=working_dir,
                                    start_new_session=True)

    def teardown(self) -> list[str]:
        """Kill our hosts (only their processes) and delete our namespaces; returns what could not be undone."""
        problems = []
        for host in self.hosts.values():
            try:
                host.kill()
            except Exception as err:  # noqa: BLE001 - go on with the rest, report below
                problems.append(f"{host.name}: {err}")
        for name in [host.name for host in self.hosts.values()] + [self.switch]:
            result = subprocess.run(["ip", "netns", "delete", name], capture_output=True, text=True)
            if result.returncode != 0 and "No such file" not in result.stderr:
                problems.append(f"netns {name}: {result.stderr.strip()}")
        return problems


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc, no psutil needed)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return sorted(found)
