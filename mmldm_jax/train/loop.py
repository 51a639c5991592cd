"""The one training loop shared by every stage (vae, autoencoder, generator).

A stage describes WHAT it trains as a `Task` (`train/tasks.py`): parameter groups, their init, a loss
per group, the input pipeline, frozen networks. `train(config, workdir, task)` does the rest, top to
bottom: mesh, input pipeline, model & optimizer, shardings, update step, checkpoint restore, train
loop, final save. It writes under the workdir (paths from `mmldm_jax.workdir`):

  <workdir>/<stage>/checkpoints/<step>/   Orbax checkpoints (train state, data iterator, config)
  <workdir>/<stage>/logs/                 metrics.jsonl and TensorBoard event files
  <workdir>/<stage>/parameters.txt        every parameter: shape, size, sharding (clu's overview)

On the console: a start line (parameters per group, steps, mesh), a progress bar with the step rate
and ETA, the metrics every `log_every` steps (`metrics.MetricsWriter`), the quality signals, and an
end line naming the checkpoint and log folders.

The train state is a dict: step (int32), params {group: tree}, opt_state {group: tree} and, with
`ema_decay > 0`, ema {group: tree}. One jitted step updates the groups in order on the same batch
(the autoencoder: generator, then discriminator, as the reference's two alternating optimisers do).
The step's randomness is `fold_in(key(config.seed), step)`, so a resumed run is bit-identical to an
uninterrupted one.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from clu import parameter_overview

from mmldm_jax import checkpoint as checkpoint_lib
from mmldm_jax import metrics as metrics_lib
from mmldm_jax import parallel
from mmldm_jax import workdir as workdir_lib
from mmldm_jax.train import optim

Params = Any
LossFn = Callable[[str, Mapping[str, Params], Any, Mapping[str, jax.Array], jax.Array, jax.Array],
                  tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass
class Task:
  """What one training stage trains; `train` does the how.

  Attributes:
    name: the stage ('vae', 'autoencoder', 'generator'); its folder under the workdir.
    train_config: its `config.train_<name>` section.
    rules_family: which `config.mesh.rules` table shards its parameters ('dit' or 'conv').
    groups: parameter groups, updated in this order each step, each with its own optimiser.
    init: rng -> {group: boxed params} (logical annotations kept; traced under jax.eval_shape/jit).
    loss: (group, params of all groups, frozen, batch, rng, step) -> (scalar loss, metrics dict).
    make_dataset: (process_index, process_count, per_host_batch, seed) -> grain IterDataset.
    to_model_batch: host batch dict -> the arrays the loss reads (numpy, leading batch axis).
    frozen: () -> placed arrays the loss reads but never updates (e.g. the VAE), or None.
    pretrained: () -> {group: parameter values} to start from instead of the init, or None.
    trainable: {group: params -> pytree of bools}; False leaves get no update (no weight decay).
    flops_per_example: training FLOPs per example for MFU, or None.
    evaluate: (params {group: tree}, frozen, mesh) -> (scalars {name: value}, images {name: uint8
      [N, H, W, 3]}, sounds {name: float waveform [N] at config.audio.sample_rate}): quality
      signals on fixed validation clips, called every `train_config.eval_every` steps and at the
      last step; None = none.
    compile_evaluate: (abstract params {group: tree}, frozen, mesh) -> the handle of a
      `parallel.BackgroundCompile` it starts, compiling `evaluate`'s programs on a second thread
      for `evaluate` to run; called once, beside the train step's compile. None = `evaluate`
      compiles at its first call.

  The step is traced under `parallel.activation_rules`, so the models' `nn.with_logical_constraint`
  calls take effect.
  """
  name: str
  train_config: Any
  rules_family: str
  groups: tuple[str, ...]
  init: Callable[[jax.Array], dict[str, Params]]
  loss: LossFn
  make_dataset: Callable[[int, int, int, int], Any]
  to_model_batch: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]
  frozen: Callable[[Any], Any] | None = None
  pretrained: Callable[[], dict[str, Params]] | None = None
  trainable: Mapping[str, Callable[[Params], Any]] = dataclasses.field(default_factory=dict)
  flops_per_example: float | None = None
  evaluate: Callable[[Any, Any, Any], tuple[dict[str, Any], dict[str, np.ndarray],
                                            dict[str, np.ndarray]]] | None = None
  compile_evaluate: Callable[[Any, Any, Any], Any] | None = None


def compute_dtype(config) -> jnp.dtype:
  """Activation dtype: config.precision 'auto' = bfloat16 on accelerators, float32 on CPU."""
  precision = config.precision
  if precision == "auto":
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
  if precision not in ("float32", "bfloat16"):
    raise ValueError(f"config.precision={precision!r}: expected 'auto', 'float32' or 'bfloat16'")
  return jnp.dtype(precision)


def saved_steps(workdir: str, name: str) -> list[int]:
  """The steps of stage `name`'s checkpoints in the workdir, oldest first ([] when none)."""
  return checkpoint_lib.saved_steps(workdir_lib.checkpoint_dir(workdir, name))


def has_checkpoint(workdir: str, task_name: str) -> bool:
  return bool(saved_steps(workdir, task_name))


def is_complete(workdir: str, task_name: str, num_steps: int) -> bool:
  """Whether the stage's final checkpoint exists."""
  return max(saved_steps(workdir, task_name), default=-1) >= num_steps


# ------------------------------------------------------------------------------------------------
# Train state
# ------------------------------------------------------------------------------------------------
def init_key(seed: int) -> jax.Array:
  """The key a fresh train state's parameters are drawn from: XLA's RngBitGenerator
  ('unsafe_rbg'), one op per parameter. With JAX's default threefry every parameter gets its own
  unrolled hash loop, and the demo autoencoder's 1,300-leaf init compiled for 60 s on a 2-core CPU
  (21 s with this). Its bits depend on the backend, so the same seed initialises differently on
  CPU and GPU; a run's checkpoints, not its seed, are what resume it. The training steps' keys
  stay threefry (`fold_in(key(seed), step)`, the same on every backend)."""
  return jax.random.key(seed, impl="unsafe_rbg")


def make_state_init(task: Task):
  """rng -> boxed train state (params, optimiser states, optional EMA), and the optimisers by group
  (filled in when init_state is first traced: a trainable mask needs the parameter structure)."""
  optimizers: dict[str, optax.GradientTransformation] = {}
  use_ema = task.train_config.ema_decay > 0

  def optimizer(group, params):
    tx = optim.make_optimizer(task.train_config)
    if group not in task.trainable:
      return tx
    mask = task.trainable[group](parallel.unbox(params))
    labels = jax.tree.map(lambda trained: "train" if trained else "frozen", mask)
    return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)

  def init_state(rng):
    params = task.init(rng)
    optimizers.update({g: optimizer(g, params[g]) for g in task.groups})
    state = {"step": jnp.zeros((), jnp.int32), "params": params,
             "opt_state": {g: optimizers[g].init(params[g]) for g in task.groups}}
    if use_ema:
      state["ema"] = jax.tree.map(lambda x: x, params)
    return state
  return init_state, optimizers


def abstract_state(init_state, task: Task, mesh, config):
  """(unboxed abstract train state with the mesh's shardings, shardings tree, boxed abstract state)
  of the state `init_state` (from `make_state_init`) builds."""
  boxed = jax.eval_shape(init_state, jax.random.key(0))
  rules = parallel.logical_rules(config, task.rules_family)
  shardings = parallel.tree_shardings(boxed, mesh, rules, config.mesh.min_sharded_bytes)
  return checkpoint_lib.abstract_with_shardings(parallel.unbox(boxed), shardings), shardings, boxed


def abstract_params(config, init, rules_family: str, mesh):
  """Abstract (shape-only) parameters {group: tree} of `init` (rng -> {group: boxed params}),
  carrying the shardings `train` gives them on `mesh` (the rules of `rules_family`)."""
  boxed = jax.eval_shape(init, jax.random.key(0))
  rules = parallel.logical_rules(config, rules_family)
  shardings = parallel.tree_shardings(boxed, mesh, rules, config.mesh.min_sharded_bytes)
  return checkpoint_lib.abstract_with_shardings(parallel.unbox(boxed), shardings)


def restore_stage_params(config, workdir: str, name: str, init, rules_family: str, mesh, *,
                         use_ema: bool = True, step: int | None = None):
  """The parameters {group: params} of stage `name`'s newest checkpoint (or `step`), placed on
  `mesh`: the EMA parameters when the stage kept them and `use_ema`. Reads only the parameters
  (no optimiser, data pipeline or train state is built); `init` (rng -> {group: boxed params},
  traced under jax.eval_shape only) names the groups wanted and their shapes. Raises
  FileNotFoundError naming the folder when the stage has no checkpoint."""
  directory = workdir_lib.checkpoint_dir(workdir, name)
  if step is None and not saved_steps(workdir, name):
    raise FileNotFoundError(f"stage {name!r} has no checkpoint in {directory}: run the {name} "
                            f"stage first")
  target = abstract_params(config, init, rules_family, mesh)
  return checkpoint_lib.restore_params(directory, target, use_ema=use_ema, step=step)


def restore_params(config, workdir: str, task: Task, mesh, *, use_ema: bool = True,
                   step: int | None = None):
  """`restore_stage_params` of `task`'s stage, groups and rules (its optimisers and dataset are
  not built)."""
  return restore_stage_params(config, workdir, task.name, task.init, task.rules_family, mesh,
                              use_ema=use_ema, step=step)


def _with_pretrained(state, values, shardings):
  """The fresh state with pretrained values (and EMA) placed on its shardings.

  `values` maps a group to the submodules it replaces, by their top-level names in that group
  ({'vae': whole VAE params} or {'autoencoder': {'unet': U-Net params}}); the rest keeps its init.
  """
  state = dict(state, params=dict(state["params"]))
  if "ema" in state:
    state["ema"] = dict(state["ema"])
  for group, group_values in values.items():
    def place(value, current, sharding):
      if tuple(np.shape(value)) != tuple(current.shape):
        raise ValueError(f"pretrained {group} parameter of shape {np.shape(value)}, model expects "
                         f"{current.shape}")
      return jax.device_put(np.asarray(value, current.dtype), sharding)
    group_params = dict(state["params"][group])
    for name, submodule_values in parallel.unbox(group_values).items():
      if name not in group_params:
        raise ValueError(f"pretrained {group}/{name}: the model has no such submodule "
                         f"(it has {', '.join(sorted(group_params))})")
      group_params[name] = jax.tree.map(place, submodule_values, group_params[name],
                                        shardings["params"][group][name])
    state["params"][group] = group_params
    if "ema" in state:
      state["ema"][group] = jax.tree.map(jnp.copy, group_params)
  return state


# ------------------------------------------------------------------------------------------------
# Update step
# ------------------------------------------------------------------------------------------------
def make_train_step(task: Task, optimizers, seed: int):
  """(state, frozen, batch) -> (state, metrics): one update of every group, NaN-guarded."""
  train_config = task.train_config
  ema_decay = float(train_config.ema_decay)
  schedule = optim.learning_rate_schedule(train_config)

  def train_step(state, frozen, batch):
    step = state["step"]
    rng = jax.random.fold_in(jax.random.key(seed), step)
    params = dict(state["params"])
    opt_state = dict(state["opt_state"])
    metrics = {"learning_rate": schedule(step)}
    all_finite = jnp.array(True)
    for index, group in enumerate(task.groups):
      group_rng = jax.random.fold_in(rng, index)

      def group_loss(group_params, group=group, group_rng=group_rng):
        return task.loss(group, {**params, group: group_params}, frozen, batch, group_rng, step)

      (loss, aux), grads = jax.value_and_grad(group_loss, has_aux=True)(params[group])
      grad_norm = optax.tree.norm(grads)
      finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

      def apply_update(grads, group_opt_state, group_params, group=group):
        updates, new_opt = optimizers[group].update(grads, group_opt_state, group_params)
        return optax.apply_updates(group_params, updates), new_opt

      def keep_unchanged(grads, group_opt_state, group_params):
        del grads
        return group_params, group_opt_state

      # A non-finite step leaves the group unchanged (nan_policy 'skip' continues from there,
      # 'stop' raises on the host; one program for both). One conditional around the whole
      # update rather than a select per leaf: on the demo autoencoder (1,232 leaves) its train
      # step compiled in 108 s against 125 s, same step time (benchmarks/nan_guard.py).
      params[group], opt_state[group] = jax.lax.cond(
          finite, apply_update, keep_unchanged, grads, opt_state[group], params[group])
      all_finite &= finite
      prefix = "" if len(task.groups) == 1 else f"{group}/"
      metrics.update({f"{prefix}loss": loss, f"{prefix}grad_norm": grad_norm})
      metrics.update({f"{prefix}{k}": v for k, v in aux.items()})
    new_state = {"step": step + 1, "params": params, "opt_state": opt_state}
    if "ema" in state:
      new_state["ema"] = jax.tree.map(lambda e, p: ema_decay * e + (1 - ema_decay) * p,
                                      state["ema"], params)
    metrics["finite"] = all_finite.astype(jnp.float32)
    return new_state, metrics
  return train_step


# ------------------------------------------------------------------------------------------------
# Quality signals
# ------------------------------------------------------------------------------------------------
def _write_quality_signals(task: Task, params, frozen, mesh, step: int, writer,
                           sample_rate: int) -> None:
  """Runs `task.evaluate` and writes its scalars (as eval/<name>), images and sounds. Waits for
  the device: it runs every eval_every steps, not every step. A non-finite signal stops the stage
  naming it (nan_policy 'stop') or is left out of the logs with a warning ('skip')."""
  scalars, images, sounds = task.evaluate(params, frozen, mesh)
  values = {f"eval/{name}": float(np.asarray(value)) for name, value in scalars.items()}
  bad = sorted(name for name, value in values.items() if not np.isfinite(value))
  if bad:
    message = (f"stage {task.name}: quality signal(s) {', '.join(bad)} not finite at step "
               f"{step}")
    if task.train_config.nan_policy == "stop":
      raise FloatingPointError(message + f"; set train_{task.name}.nan_policy='skip' to go on")
    logging.warning("%s; not logged", message)
    values = {name: value for name, value in values.items() if name not in bad}
  writer.scalars(step, values)
  writer.images(step, {f"eval/{name}": image for name, image in images.items()})
  writer.audio(step, {f"eval/{name}": sound for name, sound in sounds.items()}, sample_rate)
  logging.info("%s: step %d quality %s", task.name, step,
               " ".join(f"{name[5:]}={value:.4g}" for name, value in sorted(values.items())))


# ------------------------------------------------------------------------------------------------
# Console
# ------------------------------------------------------------------------------------------------
def parameter_summary(params: Mapping[str, Any]) -> str:
  """One line for the console: the parameter count of {group: tree} and, with several groups,
  of each ('1,234 parameters (autoencoder 1,000, discriminator 234)'). Leaves need only a
  shape (abstract parameters do)."""
  counts = {group: int(parameter_overview.count_parameters(tree)) for group, tree in params.items()}
  line = f"{sum(counts.values()):,} parameters"
  if len(counts) > 1:
    line += " (" + ", ".join(f"{group} {count:,}" for group, count in counts.items()) + ")"
  return line


def write_parameter_table(path: str, params: Mapping[str, Any], mesh) -> None:
  """Every parameter of {group: tree} with its shape, size and sharding (clu's parameter overview,
  one table per group) into `path`. Leaves need a shape, a dtype and a `sharding` (abstract
  parameters from `abstract_state` have them)."""
  tables = [f"mesh {dict(mesh.shape)} over {mesh.size} device(s), {jax.process_count()} "
            f"process(es)"]
  for group, tree in params.items():
    tables.append(f"\n{group}:\n" + parameter_overview.get_parameter_overview(
        tree, include_stats="sharding"))
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(tables) + "\n")


def _format_seconds(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


# ------------------------------------------------------------------------------------------------
# The loop
# ------------------------------------------------------------------------------------------------
def train(config, workdir: str, task: Task, devices=None) -> dict[str, Any]:
  """Trains `task` to `train_config.num_steps`, resuming from its latest checkpoint, on `devices`
  (default: all).

  Returns {'step': final step, 'skipped_steps': count, 'preempted': False}. Skips itself (returns at
  once) when the final checkpoint exists. On SIGTERM / preemption it saves and raises SystemExit.
  """
  train_config = task.train_config
  num_steps = int(train_config.num_steps)
  if is_complete(workdir, task.name, num_steps):
    logging.info("%s: final checkpoint (step %d) exists in %s, skipped", task.name, num_steps,
                 workdir_lib.checkpoint_dir(workdir, task.name))
    return {"step": num_steps, "skipped_steps": 0, "preempted": False}
  started = time.perf_counter()

  # ---- Mesh ------------------------------------------------------------------------------------
  mesh = parallel.create_mesh(config, devices)
  rules = parallel.logical_rules(config, task.rules_family)

  # ---- Input pipeline --------------------------------------------------------------------------
  per_host = parallel.per_process_batch_size(train_config.batch_size, mesh,
                                             f"train_{task.name}.batch_size")
  dataset = task.make_dataset(jax.process_index(), jax.process_count(), per_host, config.seed)
  data_iterator = iter(dataset)

  # ---- Model & optimizer -----------------------------------------------------------------------
  init_state, optimizers = make_state_init(task)

  # ---- Shardings -------------------------------------------------------------------------------
  target, state_shardings, boxed = abstract_state(init_state, task, mesh, config)
  table = workdir_lib.parameters_file(workdir, task.name)
  if jax.process_index() == 0:
    os.makedirs(os.path.dirname(table), exist_ok=True)
    write_parameter_table(table, target["params"], mesh)
  logging.info("%s: training %s for %d steps on %d device(s) (mesh %s; every parameter with its "
               "sharding: %s)", task.name, parameter_summary(target["params"]), num_steps,
               mesh.size, " ".join(f"{k}={v}" for k, v in mesh.shape.items()), table)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  frozen = task.frozen(mesh) if task.frozen is not None else None
  frozen_shardings = jax.tree.map(lambda x: x.sharding, frozen)

  # ---- Update step -----------------------------------------------------------------------------
  step_fn = jax.jit(make_train_step(task, optimizers, config.seed),
                    in_shardings=(state_shardings, frozen_shardings, parallel.batch_sharding(mesh)),
                    out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  # Compiled on a second thread for the first batch's shapes while the state is initialised or
  # restored below (XLA:CPU compiles one program on one thread). Taking that batch now is safe: a
  # restore moves the iterator back to the saved position, and a fresh start trains on it.
  first_batch = parallel.global_batch(task.to_model_batch(next(data_iterator)), mesh)
  step_compile = parallel.compile_in_background(
      step_fn, target, frozen, parallel.abstract_like(first_batch), mesh=mesh, rules=rules,
      name=f"{task.name}_step")

  # ---- Checkpoint restore ----------------------------------------------------------------------
  checkpointer = checkpoint_lib.Checkpointer(
      workdir_lib.checkpoint_dir(workdir, task.name), save_every=train_config.checkpoint_every,
      keep=train_config.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    state = checkpointer.restore(latest, target, data_iterator=data_iterator)
    first_batch = None  # the restored iterator yields the saved position's batch next
    logging.info("%s: resuming at step %d", task.name, latest)
  else:
    # No rule context here: Flax would constrain scanned parameters inside the scan body, where
    # they lack their 'layers' axis; out_shardings place the result.
    def init_train_state(rng):  # named: compile logs show jit(init_train_state)
      return parallel.unbox(init_state(rng))
    state = jax.jit(init_train_state, out_shardings=state_shardings)(init_key(config.seed))
    if task.pretrained is not None:
      state = _with_pretrained(state, task.pretrained(), state_shardings)
  exempt = parallel.replicated_by_policy_bytes(boxed["params"], state_shardings["params"])
  parallel.check_sharded(state["params"], mesh, exempt_bytes=exempt,
                         what=f"stage {task.name} parameters")
  start = int(jax.device_get(state["step"]))
  eval_every = int(train_config.eval_every)
  if task.evaluate is not None and eval_every and task.compile_evaluate is not None:
    task.compile_evaluate(target["params"], frozen, mesh)  # beside the train step's compile
  compiled_step = step_compile.result()

  # ---- Train loop ------------------------------------------------------------------------------
  writer = metrics_lib.MetricsWriter(
      workdir_lib.logs_dir(workdir, task.name), total_steps=num_steps,
      global_batch_size=train_config.batch_size, log_every=train_config.log_every,
      flops_per_example=task.flops_per_example)
  watcher = checkpoint_lib.PreemptionWatcher()
  progress = tqdm.tqdm(total=num_steps, initial=start, desc=task.name, unit="step",
                       dynamic_ncols=True, disable=jax.process_index() != 0)
  previous_finite = None
  skipped = 0
  try:
    for step in range(start + 1, num_steps + 1):
      wait_start = time.perf_counter()
      if first_batch is not None:
        batch, first_batch = first_batch, None
      else:
        batch = parallel.global_batch(task.to_model_batch(next(data_iterator)), mesh)
      data_wait = time.perf_counter() - wait_start
      with parallel.activation_rules(mesh, rules):
        state, step_metrics = compiled_step(state, frozen, batch)
      # The previous step's NaN flag is ready by now; reading it does not stall this step.
      if previous_finite is not None and not bool(jax.device_get(previous_finite[1])):
        skipped += 1
        if train_config.nan_policy == "stop":
          raise FloatingPointError(
              f"stage {task.name}: loss or gradient norm is NaN/Inf at step {previous_finite[0]}; "
              f"set train_{task.name}.nan_policy='skip' to skip such steps")
        logging.warning("%s: skipped step %d (NaN/Inf)", task.name, previous_finite[0])
      previous_finite = (step, step_metrics["finite"])
      writer.step(step, step_metrics, data_wait_s=data_wait)
      progress.update()
      if task.evaluate is not None and eval_every and (step % eval_every == 0
                                                       or step == num_steps):
        _write_quality_signals(task, state["params"], frozen, mesh, step, writer,
                               int(config.audio.sample_rate))
      checkpointer.save(step, state, data_iterator=data_iterator, config=config)
      if watcher.reached(step):
        checkpointer.save(step, state, data_iterator=data_iterator, config=config, force=True)
        checkpointer.wait()
        raise SystemExit(f"stage {task.name}: preempted at step {step}; checkpoint saved, run the "
                         f"same command again to resume")

    # ---- Final save ----------------------------------------------------------------------------
    if previous_finite is not None and not bool(jax.device_get(previous_finite[1])):
      skipped += 1
      if train_config.nan_policy == "stop":
        raise FloatingPointError(f"stage {task.name}: loss or gradient norm is NaN/Inf at step "
                                 f"{previous_finite[0]}")
    checkpointer.save(num_steps, state, data_iterator=data_iterator, config=config, force=True)
  finally:
    progress.close()
    writer.close()
    watcher.close()
    checkpointer.close()
  if skipped:
    logging.warning("%s: %d step(s) skipped for NaN/Inf", task.name, skipped)
  logging.info("%s: done at step %d in %s; checkpoints (steps %s) in %s; metrics, TensorBoard "
               "events and quality-signal media in %s", task.name, num_steps,
               _format_seconds(time.perf_counter() - started),
               ", ".join(map(str, saved_steps(workdir, task.name))),
               workdir_lib.checkpoint_dir(workdir, task.name),
               workdir_lib.logs_dir(workdir, task.name))
  return {"step": num_steps, "skipped_steps": skipped, "preempted": False}
