"""`evaluation/devices.DataParallel` splits batches over the 8 forced CPU devices (conftest): the
outputs equal the unsplit ones for batches smaller than, equal to and not a multiple of the device
count (a real feature network sharded vs one device: tests/test_panns.py)."""
import numpy as np
import pytest

from mmldm_jax.evaluation import devices


def test_data_parallel_pads_and_splits_batches():
  def function(variables, batch):
    return {"scaled": batch * variables["scale"], "sum": batch.sum(axis=1)}
  parallel = devices.DataParallel(function, {"scale": np.float32(3.0)})
  assert len(parallel.devices) == 8
  for count in (1, 3, 8, 11):
    batch = np.arange(count * 4, dtype=np.float32).reshape(count, 4)
    out = parallel(batch)
    np.testing.assert_array_equal(out["scaled"], 3 * batch)
    np.testing.assert_array_equal(out["sum"], batch.sum(axis=1))
  # 11 clips ran on all 8 devices (padded to 16), 3 on three of them.
  assert sorted(parallel._placements) == [1, 3, 8]
  assert parallel.placement(8)[0].mesh.devices.size == 8
  with pytest.raises(ValueError, match="empty batch"):
    parallel(np.zeros((0, 4), np.float32))


@pytest.mark.subprocess
def test_launch_evaluate_prints_the_stage_command(tmp_path):
  """launch/evaluate.sh builds the evaluate-stage command, and refuses a weight file that is not
  there, naming the option."""
  import os
  import subprocess
  script = os.path.join(os.path.dirname(__file__), "..", "launch", "evaluate.sh")
  weights = tmp_path / "AudioCLIP-Full-Training.pt"
  weights.write_bytes(b"")
  result = subprocess.run([script, "--dry-run", "--config=configs/aist.py", "--workdir=/runs/a",
                           f"--samples={tmp_path}", f"--audioclip={weights}", "--",
                           "--config.evaluation.batch_size=64"],
                          capture_output=True, text=True, check=True)
  assert result.stdout.split() == [
      "python", "-m", "mmldm_jax.main", "--config=configs/aist.py", "--workdir=/runs/a",
      "--config.stages=evaluate", f"--config.evaluation.samples_folder={tmp_path}",
      f"--config.evaluation.audioclip_path={weights}", "--config.evaluation.batch_size=64"]
  missing = subprocess.run([script, "--dry-run", "--config=configs/aist.py", "--workdir=/runs/a",
                            "--panns=/nonexistent/Cnn14_mAP=0.431.pth"],
                           capture_output=True, text=True, check=False)
  assert missing.returncode == 2
  assert "--panns=/nonexistent/Cnn14_mAP=0.431.pth does not exist" in missing.stderr
