"""Multi-host: two CPU processes (4 devices each, gloo collectives) train a tiny generator, save and
restore; two processes 33 s apart still meet at the checkpoint manager and a gather; the launch
scripts print the commands they would run."""
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, SUITE_CACHE_FLAG

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


def _start_process(index: int, port: int, local_devices: int, command: list[str], log_path: str):
  """Starts process `index` of a 2-process CPU job (gloo collectives), its output in `log_path`:
  a file, not a pipe, since a pipe read only after the other process ends can fill and block its
  writer, and one blocked process stalls its peer in a collective."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
             JAX_PLATFORMS="cpu", JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
             JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(index))
  with open(log_path, "w") as log:
    return subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def _wait_for_all(processes, log_paths, timeout_s: float) -> list[str]:
  """Waits for processes that log to `log_paths` and returns their outputs; fails at once when one
  fails (its peers would wait in a collective) or at the timeout, with where each had got to."""
  def outputs() -> list[str]:
    result = []
    for path in log_paths:
      with open(path) as f:
        result.append(f.read())
    return result

  def report(reason: str) -> str:
    tails = [f"--- process {i} (exit code {p.poll()}), last lines:\n" + "\n".join(out.splitlines()[-15:])
             for i, (p, out) in enumerate(zip(processes, outputs()))]
    return "\n".join([reason] + tails)

  deadline = time.monotonic() + timeout_s
  while any(p.poll() is None for p in processes):
    failed = [i for i, p in enumerate(processes) if p.poll() not in (None, 0)]
    if failed or time.monotonic() > deadline:
      for p in processes:
        p.kill()
        p.wait()
      pytest.fail(report(f"process {failed[0]} failed" if failed else
                         f"the processes did not finish in {timeout_s:.0f} s"))
    time.sleep(0.5)
  if any(p.returncode != 0 for p in processes):
    pytest.fail(report("a process failed"))
  return outputs()


def _run_two_processes(workdir: str, num_steps: int, timeout_s: float = 300.0) -> list[str]:
  """Runs the generator stage as process 0 and 1 of a 2-process job; returns their outputs."""
  port = _free_port()
  command = [sys.executable, "-m", "mmldm_jax.main",
             f"--config={os.path.join(REPO_ROOT, 'configs', 'demo.py')}:tiny",
             f"--workdir={workdir}", "--config.stages=generator",
             SUITE_CACHE_FLAG,
             f"--config.train_generator.num_steps={num_steps}",
             "--config.train_generator.checkpoint_every=2", "--config.train_generator.lr=0.001",
             "--config.train_generator.log_every=1", "--config.train_generator.eval_every=0"]
  log_paths = [os.path.join(workdir, f"process_{index}_steps_{num_steps}.log") for index in (0, 1)]
  processes = [_start_process(index, port, 4, command, log_paths[index]) for index in (0, 1)]
  return _wait_for_all(processes, log_paths, timeout_s)


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


SKEWED_PROCESSES = """
import sys, time
from absl import flags
flags.FLAGS.mark_as_parsed()
import ml_collections
from mmldm_jax import checkpoint as checkpoint_lib, parallel
parallel.set_cpu_xla_flags()
parallel.maybe_initialize_distributed(ml_collections.ConfigDict({"distributed": "auto"}))
import jax, numpy as np
if jax.process_index() == 1:
  time.sleep(33)   # arrives after gloo's fixed 30 s deadline for setting up a collective
checkpointer = checkpoint_lib.Checkpointer(sys.argv[1], save_every=1, keep=1)
counts = parallel.gather_across_processes(np.int64(jax.process_index() + 1), name="test")
checkpointer.close()
print("gathered", int(np.sum(counts)))
"""


def test_processes_arriving_33_s_apart_meet(tmp_path):
  """A process that reaches the checkpoint manager (orbax's barrier) and a gather 33 s after the
  other, as one still compiling on a busy machine does, still meets it there: the barriers go
  through the coordination service, not through a CPU collective with its 30 s set-up deadline
  (which failed here before)."""
  port = _free_port()
  command = [sys.executable, "-c", SKEWED_PROCESSES, str(tmp_path / "checkpoints")]
  log_paths = [str(tmp_path / f"process_{index}.log") for index in (0, 1)]
  processes = [_start_process(index, port, 2, command, log_paths[index]) for index in (0, 1)]
  outputs = _wait_for_all(processes, log_paths, timeout_s=240)
  assert all("gathered 3" in out for out in outputs)
