"""experiments/finetune.py as two processes (jax.distributed over loopback).

Each process gets two host CPU devices; together they form one 4-device
mesh. The launcher runs in subprocesses, as a user starts it. A subprocess
that outlives its limit fails the test as a hang. A failure shows every
process's log (from its first error on, and its end): the process that
fails is often only the one whose peer failed first.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import safetensors.numpy
from xrapture._src.testing import multiprocess

import test_utils

_ROOT = test_utils.append_repo_root()
from experiments import distributed  # pylint: disable=g-import-not-at-top,wrong-import-position

_LAUNCHER = os.path.join(_ROOT, 'experiments', 'finetune.py')
_CONFIG = os.path.join(_ROOT, 'configs', 'finetune.py')
# Seconds a process may take before the test calls it hung: far above what a
# bounded error needs (its timeout_s plus start-up), far below a hang.
_ERROR_LIMIT_S = 240
_TRAIN_LIMIT_S = 600
# The launchers' environment: two host devices per process, and XLA's cheap
# optimization level (as test.sh sets for the whole suite, here also when
# this file runs alone): compiling the tiny train steps is most of this
# file's time, and the tests check what the processes do together, not how
# fast XLA's code runs. The programs, their shardings and collectives are
# the same.
_ENV = {'XLA_FLAGS': '--xla_force_host_platform_device_count=2',
        'JAX_DISABLE_MOST_OPTIMIZATIONS': '1', 'PYTHONUNBUFFERED': '1'}


class TwoProcessTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = test_utils.tmpdir(self)
    self.workdir = os.path.join(self.tmp, 'wd')

  def launch(self, process_ids, num_processes, *args, limit=_ERROR_LIMIT_S,
             config=f'{_CONFIG}:smoke', only=None):
    """Runs one launcher process per id at once; returns ``[(returncode, output)]``.

    Args:
      process_ids: ``--config.cluster.process_id`` of each process.
      num_processes: ``--config.cluster.num_processes`` of each process.
      *args: more flags, for every process.
      limit: seconds after which a process counts as hung.
      config: ``--config``.
      only: ``{process id: flags}`` for one process alone.
    """
    port = multiprocess.free_port()
    env = dict(os.environ, **_ENV)
    procs = []
    for process_id, count in zip(process_ids, num_processes):
      argv = [sys.executable, _LAUNCHER, f'--config={config}', f'--workdir={self.workdir}',
              '--config.progress_bar=False', '--config.distributed=True',
              f'--config.cluster.coordinator_address=127.0.0.1:{port}',
              f'--config.cluster.num_processes={count}',
              f'--config.cluster.process_id={process_id}', *args,
              *(only or {}).get(process_id, ())]
      log = open(os.path.join(self.tmp, f'process_{process_id}.log'), 'w+')  # pylint: disable=consider-using-with
      self.addCleanup(log.close)
      procs.append((subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.tmp), log))
    self.launched = process_ids
    results = []
    for proc, log in procs:
      try:
        proc.wait(timeout=limit)
      except subprocess.TimeoutExpired:
        for other, _ in procs:
          other.kill()
        logs = []
        for other_id, (_, other_log) in zip(process_ids, procs):
          other_log.seek(0)
          logs.append((other_id, 'killed', other_log.read()))
        self.fail(f'a process hung for {limit} s:\n{_logs(logs)}')
      log.seek(0)
      results.append((proc.returncode, log.read()))
    return results

  def assertExitCodes(self, results, code):
    """Every process of the last :meth:`launch` (its ``results``) exited with ``code``."""
    if any(returncode != code for returncode, _ in results):
      self.fail(f'expected every process to exit with {code}:\n'
                + _logs([(i, rc, out) for i, (rc, out) in zip(self.launched, results)]))

  def test_two_processes_train_write_and_resume(self):
    results = self.launch((0, 1), (2, 2), '--config.cluster.timeout_s=120',
                          limit=_TRAIN_LIMIT_S, config=f'{_CONFIG}:lora,smoke')
    self.assertExitCodes(results, 0)
    with open(os.path.join(self.workdir, 'results.json')) as f:
      self.assertEqual([r['run'] for r in json.load(f)], ['base', 'lora'])
    # Each process wrote its own shards of every checkpoint; process 0 the rest.
    for run in ('base', 'lora'):
      for step in ('3', '6'):
        shards = glob.glob(os.path.join(self.workdir, run, 'checkpoints', step, 'state',
                                        'ocdbt.process_*'))
        self.assertCountEqual([os.path.basename(s) for s in shards],
                              ['ocdbt.process_0', 'ocdbt.process_1'], (run, step))
    lora = os.path.join(self.workdir, 'lora')
    with open(os.path.join(lora, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f]
    steps = [(r['step'], r['split']) for r in records]
    self.assertLen(set(steps), len(steps))  # one writer: no record twice
    self.assertIn((6, 'val'), steps)
    adapter = _read(os.path.join(lora, 'adapter.safetensors'))
    with open(os.path.join(lora, 'result.json')) as f:
      result = json.load(f)

    # The adapter is an ordinary xrapture file: it loads in one process.
    from experiments import lm_model  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    import xrapture  # pylint: disable=g-import-not-at-top
    with open(os.path.join(self.workdir, 'base', 'model.json')) as f:
      model = ml_collections.ConfigDict(
          {k: v for k, v in json.load(f).items() if k not in ('domain', 'result')})
    base = lm_model.load_base(os.path.join(self.workdir, 'base'), model)
    params = xrapture.load_adapter(os.path.join(lora, 'adapter.safetensors'), base)
    self.assertIsInstance(
        params['blocks/__layer_stack_no_per_layer/block/attn/value']['w'],
        xrapture.LoraWeight)

    # Undo the LoRA run back to its step-3 checkpoint (as a kill after it
    # would leave it) and run both processes again: they resume there and
    # end with the same adapter.
    shutil.rmtree(os.path.join(lora, 'checkpoints', '6'))
    for name in ('result.json', 'adapter.safetensors'):
      os.remove(os.path.join(lora, name))
    os.remove(os.path.join(self.workdir, 'results.json'))
    results = self.launch((0, 1), (2, 2), '--config.cluster.timeout_s=120',
                          limit=_TRAIN_LIMIT_S, config=f'{_CONFIG}:lora,smoke')
    self.assertExitCodes(results, 0)
    for _, output in results:
      self.assertIn('lora: resuming from step 3', output)
    again = _read(os.path.join(lora, 'adapter.safetensors'))
    self.assertCountEqual(again, adapter)
    for name in adapter:
      np.testing.assert_array_equal(again[name], adapter[name], name)
    with open(os.path.join(lora, 'result.json')) as f:
      resumed = json.load(f)
    for key in ('val_bpb', 'test_bpb', 'trainable_params', 'opt_state_bytes'):
      self.assertEqual(resumed[key], result[key], key)
    with open(os.path.join(lora, 'metrics.jsonl')) as f:
      self.assertEqual([(r['step'], r['split'], r['loss']) for r in map(json.loads, f)],
                       [(r['step'], r['split'], r['loss']) for r in records])

  def test_a_coordinator_that_never_answers(self):
    results = self.launch((1,), (2,), '--config.cluster.timeout_s=5')
    self.assertExitCodes(results, distributed.WATCHDOG_EXIT)
    [(_, output)] = results
    self.assertRegex(output, r'process 1 of 2 .* waited 5 s \(--config.cluster.timeout_s\): '
                     r'nothing answers at the coordinator address 127\.0\.0\.1:\d+')

  @parameterized.named_parameters(('alone', (0,), (2,)),
                                  ('told_more_than_started', (0, 1), (3, 3)),
                                  ('process_0_told_more', (0, 1), (3, 2)))
  def test_processes_that_never_all_join(self, process_ids, num_processes):
    results = self.launch(process_ids, num_processes, '--config.cluster.timeout_s=5')
    self.assertExitCodes(results, distributed.WATCHDOG_EXIT)
    not_joined = (r'waited 5 s \(--config.cluster.timeout_s\): not every process '
                  r'joined\. Start one process per id 0\.\.N-1')
    # Process 0 runs the coordinator: it can only find that not all joined.
    self.assertRegex(results[0][1], not_joined)
    # Another process that looks before process 0 is up (a loaded machine can
    # take longer than timeout_s to start Python and JAX) truthfully finds
    # nothing at the coordinator address: either bounded-wait error is right.
    for _, output in results[1:]:
      self.assertRegex(output, f'({not_joined}|waited 5 s '
                       r'\(--config.cluster.timeout_s\): nothing answers at the '
                       r'coordinator address 127\.0\.0\.1:\d+)')

  def test_processes_told_different_counts(self):
    # The coordinator (process 0) expects 2, so both join; then they compare.
    results = self.launch((0, 1), (2, 3), '--config.cluster.timeout_s=60')
    self.assertExitCodes(results, 1)
    for _, output in results:
      self.assertRegex(output, r'2 processes joined, but they were told different '
                       r'numbers .*: \{0: 2, 1: 3\}')

  def test_processes_given_different_configs(self):
    results = self.launch((0, 1), (2, 2), '--config.cluster.timeout_s=60',
                          only={1: ['--config.num_steps=7']})
    self.assertExitCodes(results, 1)
    for _, output in results:
      self.assertIn('processes [1] were started with another config or --workdir '
                    'than process 0', output)

  def test_a_mesh_that_does_not_divide_the_batch(self):
    results = self.launch((0, 1), (2, 2), '--config.cluster.timeout_s=60',
                          '--config.batch_size=6', "--config.mesh=(4, 1)")
    self.assertExitCodes(results, 1)
    for _, output in results:
      self.assertIn("--config.batch_size=6 does not split over the mesh's 'data' axis "
                    'of 4 devices', output)


def _logs(processes, limit=3000):
  """``[(process id, exit status, log)]`` as text: each log from its first error, and its end."""
  parts = []
  for process_id, returncode, output in processes:
    first = min((i for i in (output.find('Traceback (most recent call last)'),
                             output.find('FATAL'), output.find('\nF1')) if i >= 0),
                default=-1)
    text = output[-limit:]
    if 0 <= first < len(output) - limit:
      text = output[first:first + limit] + '\n[...]\n' + text
    parts.append(f'--- process {process_id} (exit status {returncode}) ---\n{text}')
  return '\n'.join(parts)


def _read(path):
  with open(path, 'rb') as f:
    return safetensors.numpy.load(f.read())


if __name__ == '__main__':
  absltest.main()
