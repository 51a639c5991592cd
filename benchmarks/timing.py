"""The benchmarks' timing rule, in one place: every function is called once untimed first (which
compiles ours and pays PyTorch's one-off setup), then timed `repeats` times; a figure is the median.

`alternating_medians` times several functions call by call in turn, so that a slow minute of a
shared machine falls on all of them alike; use it where ours and the peer fit in memory together.
"""
import statistics
import time


def median_seconds(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls of `fn` after one warm-up call."""
  return alternating_medians([fn], repeats)[0]


def alternating_medians(functions, repeats: int) -> list[float]:
  """Median seconds per call of each function: one warm-up call each, then `repeats` rounds in
  which every function is called once, in turn."""
  for fn in functions:
    fn()
  times = [[] for _ in functions]
  for _ in range(repeats):
    for fn, record in zip(functions, times):
      start = time.perf_counter()
      fn()
      record.append(time.perf_counter() - start)
  return [statistics.median(record) for record in times]
