"""Optimiser of a training stage from its `config.train_<stage>` section.

The reference uses torch AdamW with its defaults (b1 0.9, b2 0.999, weight decay 0.01, eps 1e-8), a
constant learning rate and no gradient clipping; the config can add clipping, a linear warmup and a
cosine decay. Optax's AdamW matches torch's (decoupled decay scaled by the learning rate).
"""
from __future__ import annotations

import optax


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup over `warmup_steps` from 0, then constant or cosine decay to 0 at `num_steps`."""
  lr = float(train_config.lr)
  warmup = int(train_config.warmup_steps)
  decay = train_config.decay
  if decay not in ("constant", "cosine"):
    raise ValueError(f"train.decay={decay!r}: expected 'constant' or 'cosine'")
  if decay == "constant":
    after = optax.constant_schedule(lr)
  else:
    after = optax.cosine_decay_schedule(lr, max(1, int(train_config.num_steps) - warmup))
  if warmup <= 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(train_config) -> optax.GradientTransformation:
  """AdamW with the stage's settings, after optional global-norm clipping."""
  if train_config.nan_policy not in ("stop", "skip"):
    raise ValueError(f"train.nan_policy={train_config.nan_policy!r}: expected 'stop' or 'skip'")
  adamw = optax.adamw(learning_rate_schedule(train_config), b1=float(train_config.b1),
                      b2=float(train_config.b2), eps=1e-8,
                      weight_decay=float(train_config.weight_decay))
  if train_config.grad_clip and train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(float(train_config.grad_clip)), adamw)
  return adamw
