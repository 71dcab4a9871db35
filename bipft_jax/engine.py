"""The run engine: pretraining and finetuning are two jobs driven by one loop.

A job (`Job`) supplies its parts: the model and optimizer, the loss, its batches, where its
parameters come from when the run is new, and an evaluator `evaluate(params, frozen) -> dict`. The engine
owns the rest, the same for every job:
- the train state {params, opt_state} and its shardings, derived from the parameters' logical axes
  with `jax.eval_shape` (as flax's lm1b example and MaxText do: the optimizer state inherits them);
- one jitted step with the state donated; its metrics are fetched one step late, so the host never
  waits for the step it has just dispatched;
- the start: the newest intact checkpoint of the workdir (parameters, optimizer, data position),
  else the job's source merged into the model by ONE function (`model_params.merge_params`), whose
  activation scales are calibrated by ONE rule (`needs_calibration`: a binary model whose scales
  are all still at their initial 1);
- orbax checkpoints every `checkpoint_every` steps and at the end, a save on SIGTERM, Ctrl-C or a
  hangup (`distributed.StopSignals`) and, in a run of one process, on a data error, and the NaN
  stop: a non-finite loss or state ends the run before anything non-finite is saved;
- multi-host start-up (`start`) and one metrics writer (metrics.jsonl + TensorBoard).
"""
import dataclasses
import functools
import queue
import threading
import time
from typing import Any, Callable, Iterator, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from bipft_jax import checkpointing, distributed, kinds, sharding
from bipft_jax import model as model_lib
from bipft_jax import model_params, optim, profiling
from bipft_jax.errors import STOPPED, UserError, signal_exit_code
from bipft_jax.metrics_writer import MetricsWriter


def start(config) -> None:
  """Multi-host start-up, before any JAX computation, and the persistent compilation cache (reruns
  and resumes skip XLA compilation)."""
  distributed.initialize(config)
  if not jax.config.jax_compilation_cache_dir:
    from bipft_jax import assets
    jax.config.update("jax_compilation_cache_dir", str(assets.cache_dir() / "jax_compilation"))


# ----------------------------------------------------------------------------------------------
# Shardings


def param_shardings(module: nn.Module, mesh, rules) -> Any:
  """The shardings of `module`'s parameters on `mesh` under `rules`."""
  return sharding.boxed_shardings(model_params.abstract_boxed_params(module), mesh, rules)


def _abstract_boxed_state(module: nn.Module, tx: optax.GradientTransformation) -> dict:
  """{params, opt_state} as ShapeDtypeStructs, the optimizer initialised on the boxed parameters so
  that its moments carry the parameters' logical axes (nothing matched by name)."""
  return jax.eval_shape(lambda: (lambda boxed: {"params": boxed, "opt_state": tx.init(boxed)})(
      model_params.boxed_params(module, jax.random.key(0))))


def state_shardings(module: nn.Module, tx: optax.GradientTransformation, mesh, rules) -> dict:
  """Shardings of {params, opt_state}, from the logical axes of `_abstract_boxed_state`."""
  return sharding.boxed_shardings(_abstract_boxed_state(module, tx), mesh, rules)


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays (the same on every host) placed onto global shardings."""
  return jax.tree.map(lambda x, s: jax.make_array_from_callback(np.shape(x), s, lambda i: np.asarray(x)[i]),
                      tree, shardings)


def global_batch(local_batch: dict, batch_sharding: NamedSharding) -> dict:
  """Each host's rows assembled into global arrays split over the mesh."""
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(batch_sharding, x), local_batch)


def host_rows(batch: dict) -> dict:
  """This host's equal share of a batch every host holds whole (its rows in process order)."""
  count, index = jax.process_count(), jax.process_index()
  return jax.tree.map(lambda x: np.split(np.asarray(x), count)[index], batch)


def check_batch_size(name: str, size: int, divisor: int, accum: int = 1) -> None:
  """UserError unless a batch of `size` splits into `accum` micro-batches over the `divisor` batch
  shards of the mesh, and into equal rows for every host."""
  hosts = jax.process_count()
  if size % (accum * divisor) or size % hosts:
    of_accum = f"grad_accum_steps ({accum}) times " if accum > 1 else ""
    raise UserError(f"{name} {size} must be a multiple of {of_accum}the {divisor} batch shards of the mesh, "
                    f"and of the {hosts} hosts; change it or --config.mesh.shape")


def needs_calibration(params: Any, param_kinds: Any) -> bool:
  """Whether the activation scales are all still at their initial 1 (never calibrated nor trained):
  the one rule, for every start, that decides whether to calibrate them on the first batch."""
  flat = flax.traverse_util.flatten_dict(params)
  alphas = [flat[path] for path in kinds.paths_of_kind(param_kinds, kinds.ACTIVATION_SCALE)]
  return bool(alphas) and all(np.all(np.asarray(jax.device_get(a)) == 1.0) for a in alphas)


# ----------------------------------------------------------------------------------------------
# What a job supplies


@dataclasses.dataclass
class Job:
  """The parts of one training job.

  `loss_fn(params, frozen, batch, key) -> (loss, metrics)` is traced inside the step (`frozen`: the
  job's fixed inputs on the mesh, e.g. a teacher's parameters); `metrics[loss_key]` is the loss the
  NaN stop and the progress bar read. `batches(step, data_state)` restores the job's position and
  returns an iterator of (this host's rows of a batch, the data state after it) from `step` on
  (`data_state`: what `checkpoint_state` saved, None for a new run). `source()` gives the parameters
  of a new run (host arrays; merged into the model). `evaluate(params, frozen) -> dict` scores the
  parameters; `after_evaluation(step, params, scores)` lets the job keep what it needs (the best
  epoch); `checkpoint_state(data_state)` is the JSON saved with a checkpoint (a collective: every host
  calls it).
  """
  name: str
  module: nn.Module
  model_config: model_lib.BertConfig
  head: str
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  loss_fn: Callable
  loss_key: str
  batches: Callable[[int, Optional[dict]], Iterator]
  source: Callable[[], Any]
  evaluate: Callable[[Any, Any], dict]
  run_config: dict
  frozen: Any = None
  frozen_module: Optional[nn.Module] = None
  merge_complete: tuple = ()          # subtrees the source must fill whole (`model_params.merge_params`)
  after_evaluation: Callable = lambda step, params, scores: None
  checkpoint_state: Callable[[Any], dict] = lambda data_state: data_state
  describe: Callable[[int, dict], str] = lambda step, scores: f"step {step}: {scores}"
  # This host's rows of the largest batch the run trains on, for the memory report; None: every batch
  # has the first one's shape.
  largest_batch: Optional[Callable[[], dict]] = None
  # True once the job has trained enough before total_steps (early stopping): asked after each
  # evaluation (that step is then saved and the run ends) and when a run resumes.
  finished: Callable[[], bool] = lambda: False


@dataclasses.dataclass
class Schedule:
  """When the loop logs, evaluates and saves (steps; evaluation and a save also at the end)."""
  total_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  keep_checkpoints: Optional[int] = 3
  evaluate_at_start: bool = True
  keep_every: int = 0  # steps kept for good beyond keep_checkpoints: the multiples of this (0: none)
  profile_first_step: int = 0  # a jax.profiler trace of profile_steps steps from this one (0: none)
  profile_steps: int = 3

  def __post_init__(self):
    if self.profile_first_step > self.total_steps:
      raise UserError(f"profile.first_step {self.profile_first_step} is after the run's last step, "
                      f"{self.total_steps}")


# ----------------------------------------------------------------------------------------------
# The engine


def make_step(loss_fn: Callable, tx: optax.GradientTransformation, schedule: optax.Schedule, seed: int,
              accum: int = 1, max_grad_norm: float = 0.0) -> Callable:
  """(state, frozen, batch, step) -> (state, metrics); state = {params, opt_state}.

  The batch is split into `accum` micro-batches (example i goes to micro-batch i % accum, so each
  device keeps its own examples); their gradients are averaged, then scaled down to a global norm of
  `max_grad_norm` if they exceed it (0: never; `grad_norm` reports the norm before). Clipping here,
  not in `tx`, keeps the optimizer state the same tree with or without it, so a run may switch it
  when resumed. The dropout key is the seed folded with the step: a resumed run draws what the
  uninterrupted one would.
  """
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state, frozen, batch, step):
    key = jax.random.fold_in(jax.random.key(seed), step)
    params = state["params"]
    if accum == 1:
      (_, metrics), grads = grad_fn(params, frozen, batch, key)
    else:
      micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1), batch)

      def accumulate(total, inputs):
        micro_batch, i = inputs
        (_, metrics), grads = grad_fn(params, frozen, micro_batch, jax.random.fold_in(key, i))
        return jax.tree.map(jnp.add, total, (grads, metrics)), None

      first = jax.tree.map(lambda x: x[0], micro)
      zeros = jax.tree.map(jnp.zeros_like, jax.eval_shape(
          lambda: (params, grad_fn(params, frozen, first, key)[0][1])))
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(accum)))
      grads, metrics = jax.tree.map(lambda x: x / accum, (grads, metrics))
    metrics["grad_norm"] = norm = optax.tree.norm(grads)
    if max_grad_norm:
      grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, max_grad_norm / norm), grads)  # as optax's, statelessly
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics["learning_rate"] = schedule(step)
    state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state}
    metrics["state_finite"] = checkpointing.all_finite(state)  # fetched with the metrics: no extra sync
    return state, metrics

  return train_step


class Engine:
  """One job's state, shardings and jitted functions on one mesh."""

  def __init__(self, job: Job, mesh: jax.sharding.Mesh, rules: tuple, *, seed: int, grad_accum_steps: int = 1,
               max_grad_norm: float = 0.0):
    self.job, self.mesh, self.rules, self.seed, self.grad_accum_steps = job, mesh, rules, seed, grad_accum_steps
    boxed_state = _abstract_boxed_state(job.module, job.tx)
    self.state_shardings = sharding.boxed_shardings(boxed_state, mesh, rules)
    # The target of a restore: the same shapes, unboxed, on their shardings.
    self.abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                       nn.meta.unbox(boxed_state), self.state_shardings)
    self.frozen_shardings = (param_shardings(job.frozen_module, mesh, rules) if job.frozen_module is not None
                             else None)
    self.batch_sharding = sharding.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    params_sh = self.state_shardings["params"]
    step = make_step(job.loss_fn, job.tx, job.schedule, seed, grad_accum_steps, max_grad_norm)
    self._train_step = jax.jit(step, in_shardings=(self.state_shardings, self.frozen_shardings,
                                                   self.batch_sharding, replicated),
                               out_shardings=(self.state_shardings, replicated), donate_argnums=(0,))
    merge = functools.partial(model_params.merge_params, job.module, complete=job.merge_complete)
    self._merge = jax.jit(merge, out_shardings=params_sh)
    self._calibrate = jax.jit(functools.partial(model_params.calibrate_alphas, job.module), out_shardings=params_sh)
    self._init_opt = jax.jit(job.tx.init, out_shardings=self.state_shardings["opt_state"])

  def on_mesh(self, fn: Callable, *args):
    """`fn(*args)` traced under the mesh and rules (the model's activation constraints need both)."""
    with sharding.on_mesh(self.mesh, self.rules):
      return fn(*args)

  def place_frozen(self) -> Any:
    return None if self.job.frozen is None else put_global(self.job.frozen, self.frozen_shardings)

  def new_state(self, source_params: Any, first_batch: Optional[dict]) -> dict:
    """Params merged from `source_params` (fresh leaves where it has none), the activation scales
    calibrated on `first_batch` if `needs_calibration`, a fresh optimizer state."""
    replicated = NamedSharding(self.mesh, PartitionSpec())
    source = put_global(jax.device_get(source_params), jax.tree.map(lambda _: replicated, source_params))
    try:
      params = self.on_mesh(self._merge, source, jax.random.key(self.seed))
    except ValueError as e:
      raise UserError(f"the initial parameters do not fit the model: {e}") from None
    if first_batch is not None and needs_calibration(params, model_params.param_kinds(self.job.module)):
      params = self.on_mesh(self._calibrate, params, {k: first_batch[k] for k in model_lib.MODEL_INPUTS})
      distributed.log(f"bipft {self.job.name}: activation scales calibrated on the first training batch")
    return {"params": params, "opt_state": self.on_mesh(self._init_opt, params)}

  def train_step(self, state: dict, frozen: Any, batch: dict, step: int) -> tuple:
    return self.on_mesh(self._train_step, state, frozen, batch, jnp.int32(step))

  def compiled_step(self, state: dict, frozen: Any, batch: dict):
    """The train step compiled ahead of time for these inputs (the compilation the step's first call
    then reuses): its `memory_analysis()` is XLA's account of the memory a device needs."""
    return self.on_mesh(lambda *args: self._train_step.lower(*args).compile(), state, frozen, batch, jnp.int32(0))

  def memory_report(self, state: dict, frozen: Any, batch: dict, which: str = "") -> Optional[str]:
    """What a step on `batch` (`which` batches: "the longest" or "") takes of a device's memory, by
    XLA's account of the compiled step (None where the backend gives none)."""
    try:
      memory = self.compiled_step(state, frozen, batch).memory_analysis()
    except NotImplementedError:
      return None
    if memory is None:
      return None
    held = memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
    work = memory.temp_size_in_bytes
    limit = (self.mesh.local_devices[0].memory_stats() or {}).get("bytes_limit")  # another host's: an error
    shape = " x ".join(map(str, batch["input_ids"].shape))
    if self.grad_accum_steps > 1:
      shape += f" in {self.grad_accum_steps} micro-batches"
    batches = f"{which} batches, {shape}," if which else f"batches of {shape}"
    return (f"a step on {batches} takes {_size(held + work)} a device"
            + (f" of its {_size(limit)}" if limit else "") + f" (XLA's account: {_size(held)} of parameters, "
            f"optimizer state, frozen weights and batch; {_size(work)} of activations and workspace)")

  def global_batch(self, local_batch: dict) -> dict:
    return global_batch(local_batch, self.batch_sharding)

  def fit(self, workdir: str, schedule: Schedule, checkpoint_dir: Optional[str] = None) -> dict:
    """Runs (or resumes) the job in `workdir` (metrics; checkpoints too, unless `checkpoint_dir`) to
    `schedule.total_steps`.

    Returns {"step", "metrics" (the last logged), "start" and "final" (evaluations), "params"} or,
    after the save that a SIGTERM, Ctrl-C or hangup asked for, {"step", "stopped_by": the signal}."""
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # local or gs://
    manager = checkpointing.make_manager(checkpoint_dir or workdir, max_to_keep=schedule.keep_checkpoints,
                                         keep_period=schedule.keep_every or None)
    try:
      _check_kept_steps(manager, schedule)
      state, step, batches = self._start(workdir, manager)
      if step >= schedule.total_steps:  # a finished run's rerun, or total_steps lowered
        distributed.log(f"bipft {self.job.name}: {workdir} is at step {step}, total_steps is "
                        f"{schedule.total_steps}: nothing left to train")
      elif self.job.finished():
        distributed.log(f"bipft {self.job.name}: {workdir} stopped early at step {step}: nothing left to train")
      return _Loop(self, workdir, manager, schedule).run(state, step, batches)
    finally:
      try:
        manager.wait_until_finished()  # the last step's write: WriteFailed if it could not be written
      finally:
        manager.close()

  def _start(self, workdir: str, manager) -> tuple:
    """(state, first step, batches): the newest intact checkpoint, else a new state from the source."""
    newest = manager.latest_step()
    if newest is not None:
      checkpointing.check_same_model(manager, newest, self.job.model_config)
    resumed = checkpointing.restore_newest_intact(manager, self.abstract_state)
    if resumed is not None:
      step, restored, skipped = resumed
      for error in skipped:
        distributed.log(f"bipft {self.job.name}: skipped step {error.step}, {error.reason}; "
                        f"moved it to {error.moved_to}")
      distributed.log(f"bipft {self.job.name}: resuming {workdir} from step {step}")
      self._note_changed_settings(manager, step)
      state = {"params": restored["params"], "opt_state": restored["opt_state"]}
      return state, step, self.job.batches(step, restored.get("data"))
    batches = self.job.batches(0, None)
    first = next(batches)
    state = self.new_state(self.job.source(), self.global_batch(first[0]))
    return state, 0, _prepend(first, batches)

  def _note_changed_settings(self, manager, step: int) -> None:
    """Says which settings differ from those the run was saved with (extending total_steps, say, is
    legitimate, but it also moves the learning rate of a decaying schedule) and the learning rate
    the resumed step now gets."""
    saved, changes = checkpointing.changed_settings(manager, step, self.job.run_config)
    if not changes:
      return
    listed = "; ".join(f"{name} {then!r} -> {now!r}" for name, then, now in changes)
    note = f"bipft {self.job.name}: settings changed since step {step} was saved: {listed}"
    try:
      then_rate = float(optim.learning_rate_schedule(ml_collections.ConfigDict(saved["optimizer"]))(step))
    except (UserError, KeyError, TypeError, ValueError):  # a record without a usable optimizer section
      then_rate = None
    now_rate = float(self.job.schedule(step))
    if then_rate is not None and then_rate != now_rate:
      note += f" (learning rate at step {step}: {now_rate:.3g}, {then_rate:.3g} in the saved run's schedule)"
    distributed.log(note)


def _check_kept_steps(manager, schedule: Schedule) -> None:
  """UserError if the workdir holds steps beyond its newest keep_checkpoints (an earlier keep_every's
  milestones, or an earlier keep_checkpoints') that this run's settings would delete at its first save:
  a resume that left out --config.keep_every removed the milestones it had kept "for good"."""
  older = sorted(manager.all_steps())[:-schedule.keep_checkpoints]
  doomed = [step for step in older if not (schedule.keep_every and step % schedule.keep_every == 0)]
  if doomed:
    raise UserError(f"{manager.directory} keeps step{'s' * (len(doomed) > 1)} {', '.join(map(str, doomed))} beyond its "
                    f"newest {schedule.keep_checkpoints}, which this run would delete (keep_checkpoints="
                    f"{schedule.keep_checkpoints}, keep_every={schedule.keep_every}): pass the settings that kept "
                    "them (keep_every, keep_checkpoints), or move those steps out of the workdir")


def _prepend(first, rest: Iterator) -> Iterator:
  yield first
  yield from rest


class Prefetch:
  """Items of an iterator made in a background thread, so data preparation overlaps the steps."""

  def __init__(self, items: Iterator, size: int = 2):
    self.items, self.queue, self.stopped = items, queue.Queue(size), threading.Event()
    threading.Thread(target=self._fill, daemon=True).start()

  def _fill(self):
    try:
      for item in self.items:
        while not self.stopped.is_set():
          try:
            self.queue.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if self.stopped.is_set():
          return
      self.queue.put(StopIteration())
    except Exception as e:  # handed to the training thread, which raises it
      self.queue.put(e)
    finally:  # in this thread, which runs it: a generator's cleanup (pretraining's worker processes)
      getattr(self.items, "close", lambda: None)()

  def __iter__(self):
    return self

  def __next__(self):
    item = self.queue.get()
    if isinstance(item, BaseException):
      raise item
    return item

  def close(self):
    self.stopped.set()


def _size(size: int) -> str:
  return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


INPUT_BOUND = 0.25  # an input_wait_fraction above this is said once, measured over at least:
INPUT_BOUND_SECONDS = 10.0  # (tiny runs' milliseconds between logs are no evidence)


class _Loop:
  """The steps of one `Engine.fit` call, with logging, evaluation, checkpoints, the stop on a signal and
  the NaN stop."""

  def __init__(self, engine: Engine, workdir: str, manager, schedule: Schedule):
    self.engine, self.job, self.workdir, self.manager, self.schedule = engine, engine.job, workdir, manager, schedule
    self.record = checkpointing.config_record(self.job.model_config, self.job.head, self.job.run_config)
    self.logged = {}
    self.waited = 0.0  # seconds the loop waited for batches since the last log
    self.warned_of_input = False

  def run(self, state: dict, step: int, batches: Iterator) -> dict:
    from tqdm import tqdm
    job, schedule = self.job, self.schedule
    frozen = self.engine.place_frozen()
    # An evaluation at the start is written again: a rerun of a finished run (or one resumed at an
    # evaluated step) logged the step's evaluation twice.
    evaluation = lambda record: schedule.evaluate_at_start and job.loss_key not in record
    writer, prefetch = MetricsWriter(self.workdir, start_step=step, rewritten=evaluation), Prefetch(batches)
    # Before the bar, which keeps the stream it finds: the signals' console guard (a hangup stops the run).
    signals = distributed.StopSignals(say=lambda line: self.bar.write(f"bipft {job.name}: {line}"))
    self.bar = tqdm(total=schedule.total_steps, initial=step, desc=job.name, disable=not distributed.is_primary(),
                    dynamic_ncols=True)
    self.writer = writer
    pending, data_state, memory_unreported = None, None, True
    profile = profiling.StepProfile(self.workdir, schedule.profile_first_step, schedule.profile_steps,
                                    say=self._say)
    try:
      start = final = self._evaluate(step, state["params"], frozen) if schedule.evaluate_at_start else None
      self.reported_at = self.logged_at = time.perf_counter()
      while step < schedule.total_steps and not job.finished():
        asked = time.perf_counter()
        try:
          batch, data_state = next(prefetch)
        except UserError as e:  # the data failed (a corpus cut short, say): the steps trained are whole
          raise self._saved_first(e, step, state, data_state) from None
        self.waited += time.perf_counter() - asked
        tokens = int(np.sum(batch["attention_mask"])) * jax.process_count()
        global_batch = self.engine.global_batch(batch)
        if memory_unreported:
          largest = job.largest_batch and self.engine.global_batch(job.largest_batch())
          memory_unreported, report = False, self.engine.memory_report(
              state, frozen, largest or global_batch, "the longest" if largest else "")
          if report:
            self._say(report)
        profile.before(step + 1)
        with jax.profiler.StepTraceAnnotation(job.name, step_num=step + 1):
          state, metrics = self.engine.train_step(state, frozen, global_batch, step)
          profile.wait(state)
        if pending:
          self._report(*pending)  # the previous step's metrics: computed by now
        step += 1
        profile.after(step)
        pending = (step, metrics, tokens)
        last, stop = step == schedule.total_steps, signals.stop_at(step)  # asked once: a signal
        stop = None if last else stop                                      # arriving later waits a step
        save = step % schedule.checkpoint_every == 0 or last or stop
        evaluate = step % schedule.eval_every == 0 or last
        if save or evaluate or step % schedule.log_every == 0:
          self._report(*pending)
          pending = None
        if evaluate:
          final = self._evaluate(step, state["params"], frozen)
          save = save or job.finished()
        if save:
          self._save(step, state, data_state)
        if stop:
          self.manager.wait_until_finished()
          self._say(f"{STOPPED[signal_exit_code(stop)]}: saved step {step} to {self.workdir}; rerun the "
                    "command to resume")
          return {"step": step, "stopped_by": stop}
      if pending:
        self._report(*pending)
    finally:
      profile.stop(step)
      self.bar.close()
      prefetch.close()
      writer.close()
      signals.close()
    return {"step": step, "metrics": self.logged, "start": start, "final": final, "params": state["params"]}

  def _saved_first(self, error: UserError, step: int, state: dict, data_state) -> UserError:
    """The data's `error`, once the steps trained since the newest checkpoint are saved where this
    process can save alone. A job of several cannot: the other processes are in the step's
    collectives, and a save of one would wait for them forever."""
    self.manager.wait_until_finished()
    if data_state is None or distributed.several_processes() or self.manager.latest_step() == step:
      return error
    self._save(step, state, data_state)
    self.manager.wait_until_finished()
    return UserError(f"{error} (step {step} saved first)")

  def _save(self, step: int, state: dict, data_state) -> None:
    """Starts the (asynchronous) save of `step`: parameters, optimizer and data state, the run's record."""
    checkpointing.save(self.manager, step, params=state["params"], opt_state=state["opt_state"],
                       data_state=self.job.checkpoint_state(data_state), config=self.record)

  def _report(self, step: int, metrics: dict, tokens: int) -> None:
    """Fetches a step's metrics, stops on a non-finite loss or state, logs every `log_every`."""
    metrics = jax.device_get(metrics)
    loss, finite = float(metrics[self.job.loss_key]), bool(metrics.pop("state_finite"))
    if not (np.isfinite(loss) and finite):  # checked every step, so nothing non-finite is ever saved
      self.bar.close()  # the bar's last line before the error, not after it
      raise UserError(diverged(self.manager, step - 1, loss))
    now = time.perf_counter()
    seconds, self.reported_at = now - self.reported_at, now  # steps run back to back: one step's time
    self.bar.update(step - self.bar.n)
    self.bar.set_postfix(loss=f"{loss:.4f}")
    if step % self.schedule.log_every == 0 or step == self.schedule.total_steps:
      self.logged = {k: float(v) for k, v in metrics.items()}
      self.logged["tokens_per_second"] = tokens / max(seconds, 1e-9)
      # The share of the time since the last log the loop spent waiting for batches: the data pipeline
      # (tokenizing on the fly) falling behind the accelerators.
      interval = now - self.logged_at
      self.logged["input_wait_fraction"] = min(1.0, self.waited / max(interval, 1e-9))
      self.waited, self.logged_at = 0.0, now
      self.writer.write(step, self.logged)
      if (self.logged["input_wait_fraction"] > INPUT_BOUND and interval >= INPUT_BOUND_SECONDS
          and not self.warned_of_input):
        self.warned_of_input = True
        self._say(f"the steps waited for data {self.logged['input_wait_fraction']:.0%} of the time up to step "
                  f"{step} (input_wait_fraction in metrics.jsonl): the data pipeline is the bottleneck; "
                  "pretraining: more --config.data.workers (processes a host making examples)")

  def _say(self, line: str) -> None:
    if distributed.is_primary():
      self.bar.write(f"bipft {self.job.name}: {line}")

  def _evaluate(self, step: int, params, frozen) -> dict:
    scores = self.job.evaluate(params, frozen)
    self.writer.write(step, scores)
    self._say(self.job.describe(step, scores))
    self.job.after_evaluation(step, params, scores)
    return scores


def diverged(manager, step: int, loss: float) -> str:
  """The error of a run whose loss or updated parameters are not finite at `step` (nothing saved).

  A checkpoint of step `step` holds the very parameters that gave a non-finite loss: it is set
  aside as `STEP.diverged`, so that the error names, and a rerun resumes from, the one before."""
  what, aside = f"the loss is {loss}", ""
  if np.isfinite(loss):
    what = "the update made the parameters non-finite"
  elif manager.latest_step() == step:
    manager.wait_until_finished()
    moved = checkpointing.set_aside(manager, step, "diverged")
    aside = f" (step {step}, whose parameters gave this loss, moved to {moved})"
  newest, stopped = manager.latest_step(), f"{what} at step {step}; stopped without saving{aside}."
  workdir, remedy = manager.directory, "lower optimizer.learning_rate, set optimizer.max_grad_norm or check the data"
  if newest is None:
    return f"{stopped} There is no checkpoint in {workdir}: {remedy}"
  return f"{stopped} The newest finite checkpoint is step {newest} in {workdir}: {remedy}, then rerun to resume from it"
