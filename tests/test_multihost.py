"""Multi-host: two CPU processes (4 devices each, gloo collectives) train a tiny generator, save and
restore; the launch scripts print the commands they would run."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

LAUNCH = os.path.join(REPO_ROOT, "launch")


def _run_script(*args):
  result = subprocess.run(["bash", *args], capture_output=True, text=True, timeout=60, check=False)
  assert result.returncode == 0, result.stderr
  return result.stdout


def test_tpu_vm_dry_run_prints_gcloud_commands():
  out = _run_script(os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "create", "--name=t1",
                    "--type=v4-16", "--zone=us-central2-b", "--spot")
  assert "gcloud compute tpus tpu-vm create t1 --zone=us-central2-b --accelerator-type=v4-16" in out
  assert "--spot" in out
  out = _run_script(os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "setup", "--name=t1")
  assert "tpu-vm scp" in out and "--worker=all" in out and "pip\\ install" in out
  out = _run_script(os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "run", "--name=t1", "--",
                    "--config=configs/aist.py", "--workdir=gs://bucket/run")
  assert "tpu-vm ssh t1" in out and "--worker=all" in out
  assert "mmldm_jax.main\\ --config=configs/aist.py\\ --workdir=gs://bucket/run" in out
  out = _run_script(os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "create", "--name=t2",
                    "--slices=2", "--type=v5litepod-16")
  assert "queued-resources create t2" in out and "--node-count=2" in out
  out = _run_script(os.path.join(LAUNCH, "tpu_vm.sh"), "--dry-run", "delete", "--name=t1")
  assert "tpu-vm delete t1" in out


def test_slurm_dry_run_prints_batch_script():
  out = _run_script(os.path.join(LAUNCH, "slurm_gpu.sh"), "--dry-run", "--nodes=2",
                    "--gpus-per-node=4", "--", "--config=configs/aist.py", "--workdir=/runs/a")
  assert "#SBATCH --nodes=2" in out and "#SBATCH --ntasks-per-node=4" in out
  assert "srun --kill-on-bad-exit=1 python -m mmldm_jax.main --config=configs/aist.py" in out
  assert "+ sbatch" in out


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_launch_scripts_are_shellcheck_clean():
  result = subprocess.run(["shellcheck", os.path.join(LAUNCH, "tpu_vm.sh"),
                           os.path.join(LAUNCH, "slurm_gpu.sh")], capture_output=True, text=True,
                          check=False)
  assert result.returncode == 0, result.stdout


def _free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def _run_two_processes(workdir: str, num_steps: int) -> list[str]:
  port = _free_port()
  processes = []
  for index in range(2):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
               JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
               JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index),
               JAX_COMPILATION_CACHE_DIR=os.path.join(REPO_ROOT, ".jax_cache"))
    command = [sys.executable, "-m", "mmldm_jax.main",
               f"--config={os.path.join(REPO_ROOT, 'configs', 'demo.py')}:tiny",
               f"--workdir={workdir}", "--config.stages=generator",
               f"--config.train_generator.num_steps={num_steps}",
               "--config.train_generator.checkpoint_every=2", "--config.train_generator.lr=0.001",
               "--config.train_generator.log_every=1", "--config.train_generator.eval_every=0"]
    processes.append(subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
  outputs = []
  for process in processes:
    try:
      out, _ = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
      for p in processes:
        p.kill()
      pytest.fail("a process of the 2-process run did not finish in 300 s")
    outputs.append(out)
    assert process.returncode == 0, out[-4000:]
  return outputs


def test_two_processes_train_save_and_resume(tmp_path):
  from test_train import generator_config, write_latents
  workdir = str(tmp_path)
  write_latents(workdir, generator_config())
  outputs = _run_two_processes(workdir, num_steps=2)
  for out in outputs:
    assert "process 0 of 2" in out or "process 1 of 2" in out
    assert "8 global devices" in out
  step_dir = os.path.join(workdir, "generator", "checkpoints", "2")
  iterator_files = [n for n in os.listdir(os.path.join(step_dir, "data")) if n.startswith("process")]
  assert sorted(iterator_files) == ["process_0-of-2.json", "process_1-of-2.json"]
  outputs = _run_two_processes(workdir, num_steps=3)
  assert all("resuming at step 2" in out for out in outputs)
  assert os.path.isdir(os.path.join(workdir, "generator", "checkpoints", "3"))
  with open(os.path.join(workdir, "generator", "logs", "metrics.jsonl")) as f:
    steps = [json.loads(line)["step"] for line in f]
  assert steps == [1, 2, 3]  # only process 0 writes metrics
