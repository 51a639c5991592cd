"""The training loop on the tiny generator (DiT on precomputed latents): fsdp=8 parameter memory, a run
killed with SIGKILL and resumed equals an uninterrupted run to the bit, a run saved on 8 devices
continues on a 2x2 mesh, NaN handling, the optimiser settings and the metrics files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import wave

import jax
import numpy as np
import pytest

from conftest import CONFIGS, REPO_ROOT
from mmldm_jax import config_lib
from mmldm_jax import parallel
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.models import dit as dit_lib
from mmldm_jax.data import latents as latents_lib
from mmldm_jax.train import loop
from mmldm_jax.train import optim
from mmldm_jax.train import tasks
from mmldm_jax.train import weights

NUM_STEPS = 6
FSDP8 = (("data", 1), ("fsdp", 8), ("tensor", 1))


def generator_config(num_steps=NUM_STEPS, mesh=FSDP8):
  config = config_lib.load(os.path.join(CONFIGS, "demo.py:tiny"))
  config.unlock()
  config.mesh.shape = mesh
  # No quality signals: they decode samples with an autoencoder, and these tests have none.
  config.train_generator.update(num_steps=num_steps, checkpoint_every=2, keep_checkpoints=3,
                                lr=1e-3, log_every=1, eval_every=0)
  return config


def write_latents(workdir, config, count=40, seed=0, clips_per_video=20):
  """Latents as the `latents` stage writes them (random values: this tests the trainer): the
  stride-1 clip windows of count / clips_per_video videos, in source order."""
  shapes = dit_lib.latent_shapes(config)
  shapes = {"audio_latent": shapes["audio"], "video_latent": shapes["video"]}
  rng = np.random.default_rng(seed)
  folder = workdir_lib.latents_dir(workdir)
  writer = latents_lib.ShardWriter(folder, "train", 0, 1, count, shapes)
  rows = np.arange(count, dtype=np.int32)
  writer.write({"audio_latent": rng.normal(size=(count,) + shapes["audio_latent"]),
                "video_latent": rng.normal(size=(count,) + shapes["video_latent"]),
                "label": np.zeros(count, np.int32), "video_index": rows // clips_per_video,
                "clip_start": rows % clips_per_video})
  writer.close()
  latents_lib.write_index(folder, "train", [("train-process_0-of-1", count)], shapes)


def final_params(workdir, config, devices=None):
  task = tasks.generator_task(config, workdir)
  mesh = parallel.create_mesh(config, devices)
  return loop.restore_params(config, workdir, task, mesh)


def read_metrics(workdir):
  with open(os.path.join(workdir, "generator", "logs", "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted fsdp=8 run of NUM_STEPS steps."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = generator_config()
  write_latents(workdir, config)
  result = loop.train(config, workdir, tasks.generator_task(config, workdir))
  assert result["step"] == NUM_STEPS
  return workdir, config


def test_fsdp8_parameter_bytes_per_device(reference_run):
  """The tiny DiT widened to 256: per-device parameter bytes at most 1/8 of the total + 5%."""
  config = generator_config()
  config.dit.update(hidden_size=256, num_heads=4)
  mesh = parallel.create_mesh(config)
  task = tasks.generator_task(config, "unused")
  init_state, _ = loop.make_state_init(task)
  _, shardings, boxed = loop.abstract_state(init_state, task, mesh, config)
  params = jax.jit(lambda rng: parallel.unbox(task.init(rng)),
                   out_shardings=shardings["params"])(jax.random.key(0))
  total, per_device = parallel.bytes_per_device(params)
  assert per_device <= total / 8 * 1.05, (per_device, total)
  parallel.check_sharded(params, mesh, axes=("fsdp",), tolerance=0.05)
  # The train state of the reference run (restored) is sharded the same way.
  workdir, ref_config = reference_run
  restored = final_params(workdir, ref_config)
  total, per_device = parallel.bytes_per_device(restored)
  exempt = parallel.replicated_by_policy_bytes(
      jax.eval_shape(tasks.generator_task(ref_config, workdir).init, jax.random.key(0)),
      jax.tree.map(lambda x: x.sharding, restored))
  assert per_device <= (total - exempt) / 8 * 1.05 + exempt


def test_params_only_restore_equals_the_params_of_a_full_restore(reference_run):
  """What sampling and the latents stage read (parameters only, no Task: the DiT's init and its
  rule family) equals the parameters of the whole train state restored as a resume does."""
  from mmldm_jax import checkpoint as checkpoint_lib
  workdir, config = reference_run
  mesh = parallel.create_mesh(config)
  task = tasks.generator_task(config, workdir)
  init_state, _ = loop.make_state_init(task)
  target, _, _ = loop.abstract_state(init_state, task, mesh, config)
  checkpointer = checkpoint_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir, "generator"),
                                             save_every=0, keep=1, async_save=False)
  full = checkpointer.restore(NUM_STEPS, target)
  checkpointer.close()
  model = dit_lib.build_dit(config, dtype=loop.compute_dtype(config))
  only = weights.restore_dit_params(config, workdir, mesh, model)
  want = (full["ema"] if "ema" in full else full["params"])["dit"]
  assert jax.tree.structure(only) == jax.tree.structure(want)
  for got, expected in zip(jax.tree.leaves(only), jax.tree.leaves(want)):
    assert got.sharding == expected.sharding
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
  assert loop.saved_steps(workdir, "generator")[-1] == NUM_STEPS


def test_loss_goes_down_and_logs_are_written(reference_run):
  workdir, _ = reference_run
  rows = read_metrics(workdir)
  assert [row["step"] for row in rows] == list(range(1, NUM_STEPS + 1))
  losses = [row["loss"] for row in rows]
  assert np.mean(losses[-2:]) < np.mean(losses[:2])
  assert {"loss_audio", "loss_video", "grad_norm", "learning_rate", "finite"} <= set(rows[0])
  assert "steps_per_s" in rows[1] and "data_wait_fraction" in rows[1]
  assert "mfu" not in rows[1]  # CPU: no peak FLOPs known
  events = [n for n in os.listdir(os.path.join(workdir, "generator", "logs"))
            if n.startswith("events.out.tfevents")]
  assert events
  # Finished: running again is a no-op.
  config = generator_config()
  result = loop.train(config, workdir, tasks.generator_task(config, workdir))
  assert result["step"] == NUM_STEPS
  assert len(read_metrics(workdir)) == NUM_STEPS


KILLED_RUN = textwrap.dedent("""
    import os, sys, time
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, {tests!r})
    import conftest  # the same devices and compilation cache as the test process
    from test_train import generator_config
    from mmldm_jax.train import loop, tasks
    workdir = sys.argv[1]
    config = generator_config()
    task = tasks.generator_task(config, workdir)
    to_model_batch = task.to_model_batch
    def slow(batch):  # slow enough that the kill lands mid-run
      time.sleep(0.25)
      return to_model_batch(batch)
    task.to_model_batch = slow
    loop.train(config, workdir, task)
""")


@pytest.mark.subprocess
def test_sigkill_and_resume_is_bit_identical(reference_run, tmp_path):
  ref_workdir, config = reference_run
  workdir = str(tmp_path / "killed")
  write_latents(workdir, config)
  script = tmp_path / "killed_run.py"
  script.write_text(KILLED_RUN.format(tests=os.path.join(REPO_ROOT, "tests")))
  process = subprocess.Popen([sys.executable, str(script), workdir], cwd=REPO_ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  checkpoints = workdir_lib.checkpoint_dir(workdir, "generator")
  deadline = time.time() + 120
  rng = np.random.default_rng()
  wait_after = rng.uniform(0.0, 0.8)  # a random point after the first checkpoint
  try:
    while time.time() < deadline:
      if os.path.isdir(os.path.join(checkpoints, "2")):
        time.sleep(wait_after)
        break
      assert process.poll() is None, process.stderr.read().decode()[-3000:]
      time.sleep(0.05)
    else:
      pytest.fail("the run wrote no checkpoint within 120 s")
  finally:
    process.send_signal(signal.SIGKILL)
    process.wait()
  steps = [int(n) for n in os.listdir(checkpoints) if n.isdigit()]
  assert 2 <= max(steps) < NUM_STEPS, steps

  result = loop.train(config, workdir, tasks.generator_task(config, workdir))
  assert result["step"] == NUM_STEPS
  resumed = final_params(workdir, config)
  reference = final_params(ref_workdir, config)
  for a, b in zip(jax.tree.leaves(resumed), jax.tree.leaves(reference)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_saved_on_8_devices_continues_on_2x2(reference_run, tmp_path):
  ref_workdir, _ = reference_run
  workdir = str(tmp_path / "reshard")
  shutil.copytree(ref_workdir, workdir)
  checkpoints = workdir_lib.checkpoint_dir(workdir, "generator")
  shutil.rmtree(os.path.join(checkpoints, str(NUM_STEPS)))  # latest is now step 4
  with open(os.path.join(workdir, "generator", "logs", "metrics.jsonl"), "w") as f:
    f.write("")
  config = generator_config(mesh=(("data", 2), ("fsdp", 2), ("tensor", 1)))
  loop.train(config, workdir, tasks.generator_task(config, workdir), devices=jax.devices()[:4])
  continued = {row["step"]: row["loss"] for row in read_metrics(workdir)}
  reference = {row["step"]: row["loss"] for row in read_metrics(ref_workdir)}
  assert sorted(continued) == [5, 6]
  for step in (5, 6):
    np.testing.assert_allclose(continued[step], reference[step], rtol=1e-4)
  params = final_params(workdir, config, devices=jax.devices()[:4])
  assert all(len(x.sharding.device_set) == 4 for x in jax.tree.leaves(params))


def test_nan_stops_naming_the_step(tmp_path):
  workdir = str(tmp_path)
  config = generator_config(num_steps=3)
  config.train_generator.checkpoint_every = 0
  write_latents(workdir, config)
  task = tasks.generator_task(config, workdir)
  to_model_batch = task.to_model_batch
  calls = []

  def poisoned(batch):
    calls.append(1)
    arrays = to_model_batch(batch)
    if len(calls) == 2:
      arrays["video_latent"] = np.full_like(arrays["video_latent"], np.nan)
    return arrays

  task.to_model_batch = poisoned
  with pytest.raises(FloatingPointError, match="at step 2"):
    loop.train(config, workdir, task)
  # 'skip' keeps the parameters of the bad step and finishes.
  calls.clear()
  config.train_generator.nan_policy = "skip"
  shutil.rmtree(os.path.join(workdir, "generator"))
  result = loop.train(config, workdir, task)
  assert result["skipped_steps"] == 1 and result["step"] == 3
  params = final_params(workdir, config)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(params))


def test_non_finite_step_leaves_the_state_unchanged_and_a_finite_one_is_adamw():
  """The step's NaN guard (one conditional around the update): a batch that makes the loss NaN
  leaves parameters and optimiser state bitwise as they were; a finite batch gives exactly the
  AdamW update of the same gradients."""
  config = generator_config(mesh=(("data", 1), ("fsdp", 1), ("tensor", 1)))
  task = tasks.generator_task(config, "unused")
  init_state, optimizers = loop.make_state_init(task)
  state = jax.jit(lambda rng: parallel.unbox(init_state(rng)))(loop.init_key(0))
  step = jax.jit(loop.make_train_step(task, optimizers, 0))
  shapes = dit_lib.latent_shapes(config)
  rng = np.random.default_rng(0)
  batch = {"audio_latent": rng.normal(size=(4,) + shapes["audio"]).astype(np.float32),
           "video_latent": rng.normal(size=(4,) + shapes["video"]).astype(np.float32)}
  poisoned = dict(batch, video_latent=np.full_like(batch["video_latent"], np.nan))

  after_nan, metrics = step(state, None, poisoned)
  assert float(metrics["finite"]) == 0.0 and int(after_nan["step"]) == 1
  for name in ("params", "opt_state"):
    for a, b in zip(jax.tree.leaves(after_nan[name]), jax.tree.leaves(state[name])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  after, metrics = step(state, None, batch)
  assert float(metrics["finite"]) == 1.0
  group = task.groups[0]

  @jax.jit   # one program: op by op, this gradient took most of the test's 20 s
  def adamw_update(params, opt_state):
    step_rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0), 0)
    grads = jax.grad(lambda p: task.loss(group, {group: p}, None, batch, step_rng, 0)[0])(params)
    updates, _ = optimizers[group].update(grads, opt_state, params)
    return jax.tree.map(lambda p, u: p + u, params, updates)
  expected = adamw_update(state["params"][group], state["opt_state"][group])
  changed = 0
  for a, b, before in zip(jax.tree.leaves(after["params"][group]), jax.tree.leaves(expected),
                          jax.tree.leaves(state["params"][group])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    changed += int(not np.array_equal(np.asarray(a), np.asarray(before)))
  assert changed > 0


def test_optimizer_matches_torch_adamw_defaults_and_schedule():
  config = generator_config()
  train = config.train_generator
  train.update(lr=1e-3, warmup_steps=10, decay="cosine", num_steps=110, grad_clip=1.0)
  schedule = optim.learning_rate_schedule(train)
  assert float(schedule(0)) == 0.0
  np.testing.assert_allclose(float(schedule(5)), 5e-4)
  np.testing.assert_allclose(float(schedule(10)), 1e-3)
  np.testing.assert_allclose(float(schedule(60)), 5e-4, rtol=1e-5)
  np.testing.assert_allclose(float(schedule(110)), 0.0, atol=1e-9)
  # One AdamW step from zero moments: p - lr * (sign(g) + wd * p), as torch.optim.AdamW.
  train.update(warmup_steps=0, decay="constant", grad_clip=0.0)
  tx = optim.make_optimizer(train)
  params = {"w": np.array([1.0, -2.0], np.float32)}
  grads = {"w": np.array([0.5, 0.25], np.float32)}
  updates, _ = tx.update(grads, tx.init(params), params)
  expected = -1e-3 * (np.sign(grads["w"]) + 0.01 * params["w"])
  np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-4)
  train.nan_policy = "ignore"
  with pytest.raises(ValueError, match="nan_policy"):
    optim.make_optimizer(train)


def test_unreadable_checkpoint_is_an_error_not_a_fresh_start(reference_run, tmp_path):
  ref_workdir, config = reference_run
  workdir = str(tmp_path / "broken")
  shutil.copytree(ref_workdir, workdir)
  checkpoints = workdir_lib.checkpoint_dir(workdir, "generator")
  shutil.rmtree(os.path.join(checkpoints, str(NUM_STEPS)))
  for root, _, files in os.walk(os.path.join(checkpoints, "4", "state")):
    for name in files:
      os.remove(os.path.join(root, name))
  with pytest.raises(RuntimeError, match="step 4"):
    loop.train(config, workdir, tasks.generator_task(config, workdir))


def test_metrics_writer_images_audio_and_peak_flops(tmp_path):
  from mmldm_jax import metrics
  assert metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert metrics.peak_flops("TPU v5 lite") == 197e12
  assert metrics.peak_flops("cpu") is None
  writer = metrics.MetricsWriter(str(tmp_path), total_steps=2, global_batch_size=4, log_every=1,
                                 flops_per_example=1e9)
  writer.step(1, {"loss": np.float32(2.0)}, data_wait_s=0.0)
  writer.step(2, {"loss": np.float32(1.0)}, data_wait_s=0.0)
  writer.images(2, {"frames": np.zeros((2, 8, 8, 3), np.uint8)})
  writer.audio(2, {"sound": np.zeros(1600, np.float32)}, sample_rate=16000)
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in rows] == [1, 2] and rows[1]["loss"] == 1.0
  event_file = [n for n in os.listdir(tmp_path) if n.startswith("events.out.tfevents")][0]
  payload = open(tmp_path / event_file, "rb").read()
  assert b"frames" in payload and b"sound" in payload and b"loss" in payload
  # The same pictures and sounds as files a person can open without TensorBoard.
  from PIL import Image
  assert np.asarray(Image.open(tmp_path / "media" / "frames_2.png")).shape == (8, 16, 3)
  with wave.open(str(tmp_path / "media" / "sound_2.wav")) as sound:
    assert (sound.getnframes(), sound.getframerate()) == (1600, 16000)


def test_continuation_trains_on_consecutive_clip_pairs(tmp_path):
  config = generator_config(num_steps=2)
  config.dit.continuation = True
  workdir = str(tmp_path)
  write_latents(workdir, config)               # 2 videos x 20 windows of 16 frames
  folder = workdir_lib.latents_dir(workdir)
  source = latents_lib.LatentSource(folder)
  pairs = latents_lib.ContinuationPairs(source, config.data.num_frames)
  assert len(pairs) == 2 * (20 - 16)           # windows starting at frames 16..19 of each video
  for index in range(len(pairs)):
    item = pairs[index]
    prev = source[pairs.pairs[index][1]]
    assert prev["video_index"] == item["video_index"]
    assert prev["clip_start"] == item["clip_start"] - config.data.num_frames
    np.testing.assert_array_equal(item["prev_video_latent"], prev["video_latent"])
    np.testing.assert_array_equal(item["prev_audio_latent"], prev["audio_latent"])
  result = loop.train(config, workdir, tasks.generator_task(config, workdir))
  assert result["step"] == 2
  losses = [row["loss"] for row in read_metrics(workdir) if "loss" in row]
  assert losses and all(np.isfinite(losses))
  # Independent flips would break the pairs; videos shorter than two clips give none.
  config.data.generator_hflip_prob = 0.5
  with pytest.raises(ValueError, match="generator_hflip_prob"):
    tasks.generator_task(config, workdir)
  short = str(tmp_path / "short")
  write_latents(short, config, count=8, clips_per_video=4)
  with pytest.raises(ValueError, match="no clip has a previous clip"):
    latents_lib.ContinuationPairs(latents_lib.LatentSource(workdir_lib.latents_dir(short)), 16)
  # Latents of the previous format (no video_index / clip_start files) are named, not half-read.
  os.remove(os.path.join(workdir_lib.latents_dir(short),
                         "train-process_0-of-1.clip_start.npy"))
  with pytest.raises(FileNotFoundError, match=r"clip_start.npy is missing .* rerun the `latents`"):
    latents_lib.LatentSource(workdir_lib.latents_dir(short))


def test_class_conditional_generator_refuses_labels_outside_the_classes(tmp_path):
  """A class-conditional DiT's latents are checked before training: a label outside
  0..num_classes-1 (inside the jitted step it would be clamped to the last class) is named with
  its file and row."""
  config = generator_config(num_steps=2)
  config.dit.class_conditional = True
  workdir = str(tmp_path)
  write_latents(workdir, config, count=8, clips_per_video=4)
  task = tasks.generator_task(config, workdir)
  task.make_dataset(0, 1, 2, 0)                 # every label 0: accepted
  path = os.path.join(workdir_lib.latents_dir(workdir), "train-process_0-of-1.label.npy")
  labels = np.load(path)
  labels[5] = config.data.num_classes
  np.save(path, labels)
  with pytest.raises(ValueError, match=rf"label.npy: field 'label' is {config.data.num_classes} "
                     rf"at row 5 \(1 of 8 rows outside the classes\); expected "
                     rf"0..{config.data.num_classes - 1}"):
    task.make_dataset(0, 1, 2, 0)
