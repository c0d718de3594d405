"""Throwaway clusters on this one machine for tests/test_launch.py: two ssh "nodes" for pdsh and a
one-node Slurm (munged + slurmctld + slurmd). Every daemon runs in the foreground under the
context manager that started it and is stopped when it exits.

What they change outside their temporary directory (needs root):
- ``/etc/hosts``: ``127.0.0.1 minillm-node1`` and ``127.0.0.2 minillm-node2``, added once (left in
  place; later runs find them).
- ``/run/sshd`` is created if absent (sshd's privilege-separation directory).
Nothing else: sshd has its own config, host key and authorized keys in the temporary directory,
and the ssh client is reached through an ``ssh`` wrapper (first on ``PATH``) that adds a
temporary ``-F`` config, so ``~/.ssh`` is not touched. Slurm and munge use their own
``SLURM_CONF``, socket, state and spool directories.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

from minillm_rl.runtime.learner import pick_free_port

NODE_ADDRESSES = {"minillm-node1": "127.0.0.1", "minillm-node2": "127.0.0.2"}
LAUNCH_DEPS = ("sshd", "ssh", "ssh-keygen", "pdsh", "munged", "slurmctld", "slurmd", "sbatch", "scontrol")


def missing_launch_deps() -> list[str]:
    return [name for name in LAUNCH_DEPS if shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")
            is None]


def poll(condition: Callable[[], object], timeout_s: float, what: str, interval_s: float = 0.5):
    """``condition()``'s first truthy value, checked every ``interval_s`` for up to ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout_s:.0f} s")
        time.sleep(interval_s)


def _port_open(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), timeout=2).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _daemon(command: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[subprocess.Popen]:
    """``command`` (a daemon in the foreground) for the duration of the block; SIGTERM, then SIGKILL."""
    with open(log, "ab") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        yield process
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _sbin(name: str) -> str:
    return shutil.which(name, path="/usr/sbin:/sbin:" + os.environ.get("PATH", "")) or name


# ---- two ssh nodes -------------------------------------------------------------------------------

def add_node_names_to_hosts(hosts_file: Path = Path("/etc/hosts")) -> None:
    text = hosts_file.read_text()
    known = {word for line in text.splitlines() for word in line.split("#")[0].split()[1:]}
    missing = [f"{address} {name}" for name, address in NODE_ADDRESSES.items() if name not in known]
    if missing:
        added = "\n".join(["# minillm_rl tests/launch_cluster.py", *missing])
        hosts_file.write_text(text.rstrip("\n") + "\n" + added + "\n")


@contextlib.contextmanager
def ssh_nodes(workdir: Path) -> Iterator[dict[str, str]]:
    """sshd listening on both node addresses; yields the environment (``PATH`` with the ssh
    wrapper first) under which ``ssh minillm-node1`` / ``pdsh -R ssh -w minillm-node2`` work
    without a password or host-key prompt."""
    add_node_names_to_hosts()
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    workdir.mkdir(parents=True, exist_ok=True)
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(workdir / key)], check=True)
    (workdir / "authorized_keys").write_text((workdir / "client_key.pub").read_text())
    port = pick_free_port()
    listen = "\n".join(f"ListenAddress {address}:{port}" for address in NODE_ADDRESSES.values())
    (workdir / "sshd_config").write_text(f"""{listen}
HostKey {workdir / 'host_key'}
AuthorizedKeysFile {workdir / 'authorized_keys'}
PidFile {workdir / 'sshd.pid'}
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
""")
    (workdir / "ssh_config").write_text(f"""Host {' '.join(NODE_ADDRESSES)}
    Port {port}
    User root
    IdentityFile {workdir / 'client_key'}
    IdentitiesOnly yes
    StrictHostKeyChecking no
    UserKnownHostsFile {workdir / 'known_hosts'}
    BatchMode yes
    LogLevel ERROR
""")
    bin_dir = workdir / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(f'#!/bin/sh\nexec {shutil.which("ssh")} -F {workdir / "ssh_config"} "$@"\n')
    wrapper.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    with _daemon([_sbin("sshd"), "-D", "-e", "-f", str(workdir / "sshd_config")], workdir / "sshd.log"):
        for address in NODE_ADDRESSES.values():
            poll(lambda: _port_open(address, port), 30, f"sshd on {address}:{port}")
        yield env


# ---- one-node Slurm ------------------------------------------------------------------------------

@contextlib.contextmanager
def slurm_cluster() -> Iterator[dict[str, str]]:
    """munged, slurmctld and slurmd for this host (one node, all its CPUs, no cgroups); yields
    the environment (``SLURM_CONF``) for sbatch/squeue/scontrol. Cancels leftover jobs and waits
    for them before stopping the daemons (job steps outlive slurmd otherwise)."""
    # munged insists that every directory above its socket is world-executable, so this cannot
    # live under pytest's 0700 tmp_path.
    root = Path(tempfile.mkdtemp(prefix="minillm_slurm_"))
    try:
        root.chmod(0o755)
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        node = socket.gethostname().split(".")[0]
        conf = root / "slurm.conf"
        conf.write_text(f"""ClusterName=minillmtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={pick_free_port()}
SlurmdPort={pick_free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root / 'munge.sock'}
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=none
SchedulerType=sched/builtin
# The main scheduling loop every second, not every 60 s: a requeued job released by
# `scontrol update StartTime=now+5` starts when the next loop sees it (a submission is scheduled at
# once either way). With the default the requeue test waited ~60 s for it.
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
GresTypes=gpu
ReturnToService=2
JobRequeue=1
KillWait=30
MinJobAge=600
NodeName={node} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} State=UNKNOWN
PartitionName=test Nodes={node} Default=YES MaxTime=INFINITE State=UP
""")
        env = {**os.environ, "SLURM_CONF": str(conf)}
        munged = [_sbin("munged"), "-F", f"--key-file={key}", f"--socket={root / 'munge.sock'}",
                  f"--pid-file={root / 'munged.pid'}", f"--log-file={root / 'log' / 'munged.log'}",
                  f"--seed-file={root / 'munge.seed'}"]
        with _daemon(munged, root / "log" / "munged.out"):
            poll(lambda: (root / "munge.sock").exists(), 30, "munged socket")
            with _daemon([_sbin("slurmctld"), "-D", "-i", "-f", str(conf)], root / "log" / "slurmctld.out", env), \
                    _daemon([_sbin("slurmd"), "-D", "-N", node, "-f", str(conf)], root / "log" / "slurmd.out", env):
                poll(lambda: _node_state(env) == "idle", 120, f"slurm node {node} idle")
                try:
                    yield env
                finally:
                    subprocess.run(["scancel", "--full", "--user=root"], env=env, check=False)
                    poll(lambda: not subprocess.run(["squeue", "-h", "-t", "PD,R,CG,S"], env=env, capture_output=True,
                                                    text=True).stdout.strip(), 120, "jobs gone after scancel")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _node_state(env: dict[str, str]) -> str:
    result = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else ""


def slurm_daemon_logs(env: dict[str, str], lines: int = 40) -> str:
    """The last lines of slurmctld's and slurmd's logs: why a job failed or was requeued, held."""
    log_dir = Path(env["SLURM_CONF"]).parent / "log"
    return "\n".join(f"--- {name} (last {lines} lines)\n" + "\n".join(
        (log_dir / name).read_text(errors="replace").splitlines()[-lines:])
        for name in ("slurmctld.log", "slurmd.log") if (log_dir / name).exists())


def job_fields(job_id: str, env: dict[str, str]) -> dict[str, str]:
    """``scontrol show job``'s ``Key=Value`` fields (no accounting database needed)."""
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                         check=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)
