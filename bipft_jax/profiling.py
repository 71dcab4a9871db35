"""A jax.profiler trace of chosen training steps (`--config.profile.first_step=N`), written to
`WORKDIR/profile/plugins/profile/<time>/`: TensorBoard's profile plugin (`pip install
tensorboard-plugin-profile`) reads the `.xplane.pb`, https://ui.perfetto.dev opens the
`.trace.json.gz`. Every host writes its own trace. Each step is annotated with its number, so the
tools split the trace by step (while tracing, a step waits for its results, so that its span is its
computation and not its dispatch); the time a step waited for data shows between them.
"""
import os
from typing import Callable

import jax


class StepProfile:
  """Traces steps `first_step` .. `first_step + steps - 1` (none if `first_step` is 0, or a resumed run
  starts after it)."""

  def __init__(self, workdir: str, first_step: int, steps: int, say: Callable[[str], None]):
    self.directory = os.path.join(workdir, "profile")
    self.first, self.last, self.say = first_step, first_step + steps - 1, say
    self.tracing = False

  def before(self, step: int) -> None:
    """Called before step `step` runs."""
    if self.first and step == self.first:
      jax.profiler.start_trace(self.directory)
      self.tracing = True

  def wait(self, state) -> None:
    """Called inside step's annotation: while tracing, the step waits for its results, so that its span
    holds its computation (the loop otherwise dispatches the next step while this one runs)."""
    if self.tracing:
      jax.block_until_ready(state)

  def after(self, step: int) -> None:
    """Called after step `step`: the trace ends after its last step."""
    if self.tracing and step >= self.last:
      self.stop(step)

  def stop(self, step: int) -> None:
    """Ends the trace at step `step` (the run's last, or the one a signal stopped it at)."""
    if not self.tracing:
      return
    jax.profiler.stop_trace()
    self.tracing = False
    runs = os.path.join(self.directory, "plugins", "profile")
    newest = max(os.listdir(runs)) if os.path.isdir(runs) else ""  # folders named by time
    self.say(f"profile of steps {self.first}-{step} written to {os.path.join(runs, newest)}")
