"""Where the autoencoder's compile time goes: the kernels of its generator loss by module, and the
compile time of the loss's forward and gradient at two XLA:CPU optimisation levels.

  python benchmarks/autoencoder_compile.py [--config=configs/aist.py:tiny] [--levels=3,1]
      [--calls=4]

For each level (`--xla_backend_optimization_level`, the LLVM -O level of the kernels XLA:CPU
emits; 3 is XLA's default), in a fresh subprocess pinned to no cache (every figure a cold
compile): the train-state init's compile, then `AutoencoderSystem.generator_loss` forward and its
gradient with respect to the autoencoder (what the trainer's step differentiates), each traced,
lowered and compiled separately, and the gradient's first and later calls. The batch is random,
shaped like 4 real clips; the VAE is randomly initialised. The first level also counts the
compiled forward's kernels (fusions, dots, convolutions) by the top-level module they come from.

What it showed (2026-12-05, aist.py:tiny, one core): the forward is about 2,400 kernels, 45% of
them the U-Net's (`denoise`); of its ~50 s compile, XLA's HLO passes take ~6 s, emitting LLVM IR
~7 s and LLVM optimising and generating machine code the rest.

Cost: about 8 minutes for two levels at aist.py:tiny on one core.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MACHINE = "2-core x86_64 CPU, 24 GiB"
COMMAND = "python benchmarks/autoencoder_compile.py"


def kernels_by_module(hlo_text: str) -> dict[str, int]:
  """Counts the ENTRY computation's kernels of compiled HLO text by the first two parts of their
  `op_name` (the flax module path), leaving out what emits no code (parameters, tuples, bitcasts,
  constants)."""
  entry = hlo_text[hlo_text.index("ENTRY"):]
  counts = collections.Counter()
  for line in entry.splitlines():
    match = re.match(r"\s*(?:ROOT )?%?[\w.\-]+ = \S+ ([\w\-]+)\(", line)
    if not match or match.group(1) in ("parameter", "get-tuple-element", "tuple", "bitcast",
                                       "constant"):
      continue
    name = re.search(r'op_name="([^"]*)"', line)
    parts = [part for part in (name.group(1) if name else "(unnamed)").split("/")
             if part and not part.startswith(("jit(", "jvp(", "transpose("))]
    counts["/".join(parts[:2]) or "(unnamed)"] += 1
  return dict(counts)


def _worker(config_path: str, calls: int, count_kernels: bool) -> dict:
  """Measures one optimisation level (XLA_FLAGS is set by the parent before JAX starts)."""
  sys.path.insert(0, REPO)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from mmldm_jax import config_lib, parallel
  from mmldm_jax.models import autoencoder as ae_lib
  from mmldm_jax.models import vae as vae_lib
  parallel.set_cpu_xla_flags()
  jax.config.update("jax_enable_compilation_cache", False)

  config = config_lib.load(config_path)
  data, batch_size = config.data, 4
  size, frames = data.image_size, data.num_frames
  vae = vae_lib.build_vae(config)
  vae_params = nn.unbox(jax.jit(vae.init)(jax.random.PRNGKey(0),
                                         jnp.zeros((1, size, size, 3))))["params"]
  system = ae_lib.AutoencoderSystem(config)
  result = {}
  start = time.perf_counter()
  fresh = jax.block_until_ready(system.init(jax.random.key(1, impl="unsafe_rbg")))
  result["init"] = time.perf_counter() - start
  params = nn.unbox(fresh["autoencoder"])
  disc_params = nn.unbox(fresh["discriminator"])
  keys = jax.random.split(jax.random.key(2), 4)
  targets = data.num_target_frames
  batch = dict(
      key_frames=jax.random.uniform(keys[0], (batch_size, len(data.key_frames), size, size, 3),
                                    minval=-1, maxval=1),
      target_frames=jax.random.uniform(keys[1], (batch_size, targets, size, size, 3),
                                       minval=-1, maxval=1),
      target_indices=jax.random.uniform(keys[2], (batch_size, targets)),
      audio=0.1 * jax.random.normal(keys[3], (batch_size, config_lib.clip_samples(config))),
      label=jnp.arange(batch_size, dtype=jnp.int32) % max(1, data.num_classes))
  rng = jax.random.PRNGKey(3)
  gradient = lambda *args: jax.grad(system.generator_loss, has_aux=True)(*args)
  for name, fn in (("forward", system.generator_loss), ("gradient", gradient)):
    start = time.perf_counter()
    lowered = jax.jit(fn).lower(params, disc_params, vae_params, batch, rng)
    result[f"{name}_trace_lower"] = time.perf_counter() - start
    start = time.perf_counter()
    compiled = lowered.compile()
    result[f"{name}_compile"] = time.perf_counter() - start
    if name == "forward" and count_kernels:
      result["kernels"] = kernels_by_module(compiled.as_text())
  durations = []
  for _ in range(calls):
    start = time.perf_counter()
    jax.block_until_ready(compiled(params, disc_params, vae_params, batch, rng))
    durations.append(time.perf_counter() - start)
  result["gradient_first_call"] = durations[0]
  result["gradient_later_calls"] = sorted(durations[1:])[len(durations[1:]) // 2]
  return result


def measure(config_path: str, level: int, calls: int, count_kernels: bool) -> dict:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                       f"--xla_backend_optimization_level={level}".strip())
  code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
          f"from autoencoder_compile import _worker; "
          f"print('RESULT ' + json.dumps(_worker({config_path!r}, {calls}, {count_kernels})))")
  process = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                           cwd=REPO)
  lines = [line for line in process.stdout.splitlines() if line.startswith("RESULT ")]
  if process.returncode or not lines:
    raise RuntimeError(f"level {level} failed (exit {process.returncode}):\n"
                       f"{process.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/aist.py:tiny")
  parser.add_argument("--levels", default="3,1", help="optimisation levels; the first is the peer")
  parser.add_argument("--calls", type=int, default=4)
  args = parser.parse_args()
  levels = [int(level) for level in args.levels.split(",")]
  if len(levels) < 2:
    parser.error("--levels needs two levels or more (the first is the peer)")
  if args.calls < 2:
    parser.error("--calls must be at least 2 (the first call is reported apart)")
  results = {}
  for index, level in enumerate(levels):
    print(f"level {level}: measuring ...", flush=True)
    results[level] = measure(args.config, level, args.calls, count_kernels=index == 0)
    timings = {key: value for key, value in results[level].items() if key != "kernels"}
    print(f"level {level}: {json.dumps(timings)}", flush=True)
  kernels = results[levels[0]]["kernels"]
  print(f"\nkernels of the compiled forward ({sum(kernels.values())} in all), by module:")
  for module, count in sorted(kernels.items(), key=lambda item: -item[1])[:12]:
    print(f"  {count:6d}  {module}")
  date = datetime.date.today().isoformat()
  peer = levels[0]
  print("\n| benchmark | command | machine | date | ours | peer | ratio |")
  print("|---|---|---|---|---|---|---|")
  for level in levels[1:]:
    for key, label in (("init", "train-state init compile"),
                       ("forward_compile", "generator-loss forward compile"),
                       ("gradient_compile", "generator-loss gradient compile"),
                       ("gradient_later_calls", "gradient call (median after the first)")):
      ours, theirs = results[level][key], results[peer][key]
      print(f"| autoencoder ({args.config}), XLA:CPU optimisation level {level} vs {peer}: {label} "
            f"| `{COMMAND} --config={args.config} --levels={peer},{level}` | {MACHINE} | {date} "
            f"| {ours:.3g} s | {theirs:.3g} s (level {peer}) | {ours / theirs:.2f} |")


if __name__ == "__main__":
  main()
