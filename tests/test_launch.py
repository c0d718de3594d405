"""The launch scripts under ``launch/``, launched for real on this machine.

- ``deepspeed_multinode.sh``: two "nodes" (two loopback names with their own sshd, pdsh over ssh)
  run the tiny SFT -> MiniLLM recipe as one 2-rank DeepSpeed job: rank 0 on minillm-node1, rank 1
  on minillm-node2, with a Ray head started by the script.
- ``slurm_minillm.sbatch``: a one-node Slurm (munged, slurmctld, slurmd started here) runs the
  batch script to the end; and a job that gets ``scancel --batch --signal=USR1`` (what
  ``--signal=B:USR1@...`` does before the time limit) checkpoints, requeues itself and resumes.
- Bad input to the scripts is refused with one line naming what was wrong.

The cluster tests need root (they edit /etc/hosts and start sshd and Slurm daemons) and the
packages ``make install-launch-deps`` installs; they are skipped only without root or apt.
See tests/launch_cluster.py for what they change on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from launch_cluster import (
    NODE_ADDRESSES,
    job_fields,
    missing_launch_deps,
    poll,
    slurm_cluster,
    slurm_daemon_logs,
    ssh_nodes,
)
from tiny_assets import write_assets

from minillm_rl.runtime.learner import pick_free_port

# One xdist group (make test: --dist loadgroup): its tests share the sshd /
# Slurm daemons the module starts.
pytestmark = pytest.mark.xdist_group("test_launch")

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
RECIPE = "launch/recipes/tiny-e2e.yaml"
SFT_STEPS = 6  # tiny-e2e: 48 training examples / sft.batch_size 8
RUN_TIMEOUT_S = 900

needs_root_and_apt = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("apt-get") is None,
    reason="needs root and apt-get (installs slurm/munge/pdsh/sshd, edits /etc/hosts, starts daemons)")


@pytest.fixture(scope="module")
def launch_deps():
    """The Debian packages, installed by the Makefile target when this file runs on its own."""
    if missing_launch_deps():
        subprocess.run(["make", "-C", str(REPO), "install-launch-deps"], check=True)
    assert not missing_launch_deps(), f"still missing after make install-launch-deps: {missing_launch_deps()}"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return write_assets(tmp_path_factory.mktemp("tiny_assets"))


def _recipe_overrides(assets, out: Path) -> list[str]:
    # One rollout worker: what these tests check is the launchers, not the number of workers.
    return [f"model.teacher={assets['teacher']}", f"model.student={assets['student']}",
            f"data.train={assets['data']}", f"output.dir={out}", "runtime.num_rollout_workers=1"]


def _run_env(base: dict[str, str], ray_tmp: Path) -> dict[str, str]:
    """CPU learners over loopback gloo; a Ray port and temp dir of this test's own."""
    # A token path of this test's own: the launch scripts write it as on a fresh cluster, whatever
    # an earlier local ray.init() left in ~/.ray.
    return {**base, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "GLOO_SOCKET_IFNAME": "lo", "RAY_PORT": str(pick_free_port()), "RAY_TMPDIR": str(ray_tmp),
            "RAY_AUTH_TOKEN_PATH": str(ray_tmp / "auth_token")}


def _metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _assert_finished(out: Path, world_size: int) -> None:
    assert (out / "best" / "config.json").is_file() and (out / "best.json").is_file()
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["world_size"] == world_size and summary["total_steps"] == SFT_STEPS + 6


@pytest.fixture
def ray_tmp():
    """Ray's --temp-dir: short (Ray's socket paths must fit 107 bytes) and removed afterwards."""
    path = Path(f"/tmp/minillm_ray_{os.getpid()}_{pick_free_port()}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------

def test_scripts_refuse_bad_input_with_one_line(tmp_path):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# nodes\nnode-a slots=2\nnode-b slots=two\n")
    result = subprocess.run([str(LAUNCH / "deepspeed_multinode.sh"), RECIPE], cwd=REPO, capture_output=True,
                            text=True, env={**os.environ, "HOSTFILE": str(hostfile)}, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert f"hostfile {hostfile} line 3: expected 'host slots=N', got 'node-b slots=two'" in result.stderr

    result = subprocess.run([str(LAUNCH / "deepspeed_multinode.sh"), "no/such/recipe.yaml"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "recipe no/such/recipe.yaml: file not found" in result.stderr

    result = subprocess.run([str(LAUNCH / "ray_cluster.sh"), "wait", "zero"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "wait needs a node count N >= 1, got 'zero'" in result.stderr

    env = {name: value for name, value in os.environ.items() if not name.startswith("SLURM_")}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_minillm.sbatch"), RECIPE], cwd=REPO, capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2 and "submit this with sbatch" in result.stderr


def test_ray_cluster_head_writes_the_auth_token_a_worker_must_find(tmp_path):
    """`ray start` refuses token auth without a token: the head writes one (private, reused),
    a worker without it is refused with one line naming where it looked."""
    token_path = tmp_path / "shared" / "ray_token"
    env = {name: value for name, value in os.environ.items() if not name.startswith("RAY_AUTH")}
    env = {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_path)}
    result = subprocess.run([str(LAUNCH / "ray_cluster.sh"), "start-worker", "127.0.0.1:1"], capture_output=True,
                            text=True, env=env, timeout=60)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert f"no Ray auth token at {token_path}" in result.stderr and not token_path.exists()

    def auth_token() -> str:
        result = subprocess.run([str(LAUNCH / "ray_cluster.sh"), "auth-token"], capture_output=True, text=True,
                                env=env, timeout=60)
        assert result.returncode == 0, result.stderr
        return result.stdout

    assert f"wrote a new Ray auth token to {token_path}" in auth_token()
    token = token_path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0 and token_path.stat().st_mode & 0o077 == 0
    assert auth_token() == "" and token_path.read_text() == token  # kept, not replaced


def test_ray_cluster_wait_times_out_instead_of_hanging():
    env = {**os.environ, "RAY_WAIT_TIMEOUT_S": "2"}
    result = subprocess.run([str(LAUNCH / "ray_cluster.sh"), "wait", "1", f"127.0.0.1:{pick_free_port()}"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode != 0 and "the Ray GCS" in result.stderr and "not there after 2 s" in result.stderr


def test_slurm_script_puts_learners_and_ray_on_disjoint_gpus(tmp_path):
    """The batch script's placement on a 2-node x 8-GPU job, with srun / scontrol / ray_cluster.sh
    replaced by stubs that print what they were asked to run."""
    # srun appends to a log; `ray_cluster.sh wait N` returns once N Ray steps are in it, as the real
    # one returns once N nodes are alive. (Without that wait the script's exit trap could kill a
    # background step before it ran: the test then saw one Ray step, on a loaded CI machine.)
    log = tmp_path / "srun.log"
    stubs = {"bin/scontrol": 'if [ "$1" = show ]; then printf "gpu-a\\ngpu-b\\n"; else echo "scontrol $*"; fi',
             "bin/srun": f'echo "srun $*" >> {log}',
             "launch/ray_cluster.sh": f"""case "$1" in
  address) echo 10.0.0.1:4321 ;;
  wait) echo "ray_cluster $*"; for i in $(seq 300); do
          [ "$(grep -c -- --overlap {log} 2>/dev/null)" -ge "$2" ] && exit 0; sleep 0.1; done; exit 1 ;;
  *) echo "ray_cluster $*" ;;
esac"""}
    for name, body in stubs.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(f"#!/bin/sh\n{body}\n")
        (tmp_path / name).chmod(0o755)
    (tmp_path / "recipe.yaml").write_text("{}\n")
    env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_JOB_ID": "77",
           "SLURM_SUBMIT_DIR": str(tmp_path), "SLURM_JOB_NODELIST": "gpu-[a-b]", "RAY_HEAD_IP": "10.0.0.1",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "TEACHER_GPUS_PER_NODE": "3"}
    result = subprocess.run(["bash", str(LAUNCH / "slurm_minillm.sbatch"), "recipe.yaml", "train.seed=2"],
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    srun = [line.split() for line in log.read_text().splitlines()]
    # The Ray steps run in the background, so their stub lines may come in either order.
    ray_steps = [args for args in srun if "--overlap" in args]
    roles = {args[args.index("-w") + 1]: args[args.index("RAY_FOREGROUND=1") + 2] for args in ray_steps}
    assert len(ray_steps) == 2 and roles == {"gpu-a": "start-head", "gpu-b": "start-worker"}
    assert all("CUDA_VISIBLE_DEVICES=5,6,7" in args and "--num-gpus=3" in args for args in ray_steps)
    (learners,) = [args for args in srun if "--overlap" not in args]
    assert "--nodes=2" in learners and "--ntasks-per-node=5" in learners and "--ntasks=10" in learners
    assert "CUDA_VISIBLE_DEVICES=0,1,2,3,4" in learners
    tail = learners[learners.index("minillm_rl.cli"):]
    assert tail == ["minillm_rl.cli", "train", "--config", "recipe.yaml", "runtime.ray_address=10.0.0.1:4321",
                    "train.seed=2", "--resume", "auto"]
    assert "ray_cluster wait 2 10.0.0.1:4321" in result.stdout


# --------------------------------------------------------------------------------------------
# deepspeed over pdsh: two nodes
# --------------------------------------------------------------------------------------------

@needs_root_and_apt
def test_deepspeed_multinode_two_nodes_over_pdsh(launch_deps, assets, tmp_path, ray_tmp):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{name} slots=1\n" for name in NODE_ADDRESSES))
    out = tmp_path / "run"
    with ssh_nodes(tmp_path / "ssh") as ssh_env:
        env = {**_run_env(ssh_env, ray_tmp), "HOSTFILE": str(hostfile), "MASTER_PORT": str(pick_free_port())}
        result = subprocess.run([str(LAUNCH / "deepspeed_multinode.sh"), RECIPE, *_recipe_overrides(assets, out)],
                                cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-6000:]
    _assert_finished(out, world_size=2)
    # pdsh prefixes each remote line with the node's name: rank r really ran on node r, over ssh.
    for rank, name in enumerate(NODE_ADDRESSES):
        assert any(line.startswith(f"{name}: deepspeed_rank.sh: rank {rank} of 2 ") and "master 127.0.0.1:" in line
                   for line in log.splitlines()), log[-6000:]
    assert "nodes minillm-node1 minillm-node2; master minillm-node1" in log
    assert "ray_cluster.sh: head at" in log and "ray_cluster.sh: stopped Ray node" in log


# --------------------------------------------------------------------------------------------
# Slurm
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def slurm(launch_deps):
    with slurm_cluster() as env:
        yield env


def _sbatch(env: dict[str, str], log: Path, *args: str) -> str:
    # --gpus-per-node=0 and --nodes=1 override the header's GPU cluster shape for this CPU node.
    result = subprocess.run(["sbatch", "--parsable", "--nodes=1", "--gpus-per-node=0", "--time=30:00",
                             f"--output={log}", str(LAUNCH / "slurm_minillm.sbatch"), *args],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=60, check=True)
    return result.stdout.strip().split(";")[0]


def _wait_for_end(job_id: str, env: dict[str, str], log: Path) -> dict[str, str]:
    def ended():
        fields = job_fields(job_id, env)
        return fields if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL") else None

    try:
        fields = poll(ended, RUN_TIMEOUT_S, f"slurm job {job_id} to end", interval_s=2)
    finally:
        print(log.read_text() if log.exists() else f"(no job log {log})")
    if fields["JobState"] != "COMPLETED":  # shown with the failure: Slurm's own account of why
        print(" ".join(f"{key}={fields.get(key)}" for key in ("JobState", "Reason", "ExitCode", "Restarts",
                                                              "BatchFlag", "StartTime", "EndTime")))
        print(slurm_daemon_logs(env))
    return fields


@needs_root_and_apt
def test_slurm_job_runs_checkpoints_on_usr1_requeues_and_resumes_to_the_end(slurm, assets, tmp_path, ray_tmp):
    """One batch job through its whole life: Ray and 2 learner ranks start, USR1 (Slurm's warning
    before the time limit) makes them checkpoint and exit 3, the script requeues the job, and the
    requeued job resumes and runs to the end. (One job, not a plain run plus a requeued one: the
    requeued job is a plain run from its checkpoint on, and each job costs ~40 s of CI.)"""
    out, log = tmp_path / "run", tmp_path / "job.out"
    env = {**_run_env(slurm, ray_tmp), "LEARNERS_PER_NODE": "2"}
    job_id = _sbatch(env, log, RECIPE, *_recipe_overrides(assets, out))
    poll(lambda: any(r.get("stage") == "sft" and "loss" in r for r in _metrics(out)), RUN_TIMEOUT_S,
         "a first SFT step in metrics.jsonl", interval_s=1)
    # What --signal=B:USR1@... does before the time limit: the batch shell alone gets USR1.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=env, check=True, timeout=60)
    # Past the transitional states (REQUEUED, COMPLETING): a PENDING job is then held by BeginTime.
    requeued = poll(lambda: (lambda f: f if f["Restarts"] == "1" and f["JobState"] not in ("REQUEUED", "COMPLETING")
                             else None)(job_fields(job_id, env)), RUN_TIMEOUT_S, f"job {job_id} requeued", interval_s=1)
    if requeued["JobState"] == "PENDING":
        # Slurm holds a requeued job for 2 minutes (BeginTime) so that its new credential postdates
        # the revoked one of the killed run: slurmd refuses a launch within the same second ("Job
        # credential revoked", the job FAILS). Released a few seconds from now instead.
        subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+5"], env=env, check=True,
                       timeout=60)
    fields = _wait_for_end(job_id, env, log)
    text = log.read_text()
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", (requeued, fields, text[-6000:])
    assert fields["Restarts"] == "1", text[-6000:]
    assert "got SIGUSR1; forwarding it to the learners" in text
    # Each rank checkpoints and exits 3 after a last barrier; srun's --kill-on-bad-exit then stops
    # a rank that is still exiting, so the step's code is 3 or that rank's SIGTERM (143). Both are
    # a checkpointed stop: the metrics below show the requeued job resumed from it.
    assert re.search(rf"learners exited with code (3|143) after SIGUSR1; requeueing job {job_id} ", text), text[-6000:]
    assert f"slurm_minillm.sbatch: job {job_id} (restart 0) on 1 node(s)" in text
    assert f"slurm_minillm.sbatch: job {job_id} (restart 1) on 1 node(s)" in text
    assert "ray_cluster.sh: 1 Ray node(s) alive" in text and "learners exited with code 0" in text
    assert text.count("stopping Ray") == 2  # after each of the two runs
    _assert_finished(out, world_size=2)
    # The requeued job resumed from the checkpoint: every SFT step and MiniLLM round was logged once.
    records = _metrics(out)
    assert [r["step"] for r in records if r["stage"] == "sft" and "loss" in r] == list(range(1, SFT_STEPS + 1))
    assert [r["round"] for r in records if "round" in r] == [0, 1, 2]
