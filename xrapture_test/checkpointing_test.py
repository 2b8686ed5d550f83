"""Tests for experiments/checkpointing.py: atomic, complete-or-absent checkpoints."""

import os
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors
import xrapture

# The repository root (in the source tree or in Bazel's runfiles), appended so
# that the installed xrapture is the one imported.
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position


def _setup():
  """Base params, adapted params with one LoraWeight, its spec and Adam state."""
  rng = np.random.default_rng(0)
  base = {'linear': {'w': jnp.asarray(rng.normal(size=(6, 5)), jnp.float32),
                     'b': jnp.zeros(5)},
          'head': {'w': jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)}}
  lora_spec = {'linear': {'w': 2, 'b': xrapture.LORA_FREEZE},
               'head': {'w': xrapture.LORA_FULL}}
  params = {'linear': {'w': xrapture.LoraWeight(
      base['linear']['w'], jnp.asarray(rng.normal(size=(2, 5)), jnp.float32),
      jnp.asarray(rng.normal(size=(6, 2)), jnp.float32), alpha=4.0),
                       'b': base['linear']['b']},
            'head': {'w': base['head']['w'] + 1.0}}
  tx = xrapture.wrap_optimizer(optax.adam(1e-2), lora_spec)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return base, params, lora_spec, tx, opt_state


class CheckpointingTest(absltest.TestCase):

  def tmpdir(self) -> str:
    # Not self.create_tempdir(): that needs absl flags parsed, which pytest does not do.
    tmp = tempfile.TemporaryDirectory()
    self.addCleanup(tmp.cleanup)
    return tmp.name

  def test_round_trip_is_exact(self):
    base, params, lora_spec, tx, opt_state = _setup()
    directory = self.tmpdir()
    checkpointing.save(directory, 5, params, lora_spec, opt_state, extra={'seed': 3})
    self.assertEqual(checkpointing.latest_step(directory), 5)
    got_params, got_opt, state = checkpointing.restore(
        directory, 5, base, tx.init(params))
    self.assertEqual(state['step'], 5)
    self.assertEqual(state['seed'], 3)
    self.assertIsInstance(got_params['linear']['w'], xrapture.LoraWeight)
    self.assertEqual(got_params['linear']['w'].alpha, 4.0)
    for want, got in zip(jax.tree.leaves((params, opt_state)),
                         jax.tree.leaves((got_params, got_opt))):
      np.testing.assert_array_equal(np.asarray(want), np.asarray(got))

  def test_only_the_trainable_part_is_written(self):
    base, params, lora_spec, _, opt_state = _setup()
    directory = self.tmpdir()
    path = checkpointing.save(directory, 1, params, lora_spec, opt_state)
    with safetensors.safe_open(os.path.join(path, checkpointing.TRAINABLE), 'numpy') as f:
      self.assertCountEqual(f.keys(), ['linear/w::a', 'linear/w::b', 'head/w'])
    del base

  def test_keeps_the_newest(self):
    _, params, lora_spec, _, opt_state = _setup()
    directory = self.tmpdir()
    for step in (1, 2, 3, 4):
      checkpointing.save(directory, step, params, lora_spec, opt_state, keep=2)
    self.assertEqual(checkpointing.all_steps(directory), [3, 4])

  def test_a_failed_write_leaves_nothing_behind(self):
    _, params, lora_spec, _, opt_state = _setup()
    directory = self.tmpdir()
    checkpointing.save(directory, 1, params, lora_spec, opt_state)
    with mock.patch.object(np, 'savez', side_effect=OSError('disk full')):
      with self.assertRaisesRegex(OSError, 'disk full'):
        checkpointing.save(directory, 2, params, lora_spec, opt_state)
    self.assertEqual(os.listdir(directory), ['step_00000001'])
    self.assertEqual(checkpointing.latest_step(directory), 1)

  def test_partial_directories_are_ignored(self):
    _, params, lora_spec, _, opt_state = _setup()
    directory = self.tmpdir()
    checkpointing.save(directory, 1, params, lora_spec, opt_state)
    os.makedirs(os.path.join(directory, '.tmp-step_00000002-x'))  # killed mid-write
    os.makedirs(os.path.join(directory, 'step_00000003'))  # no state.json
    self.assertEqual(checkpointing.latest_step(directory), 1)

  def test_other_optimizer_is_refused(self):
    base, params, lora_spec, _, opt_state = _setup()
    directory = self.tmpdir()
    checkpointing.save(directory, 1, params, lora_spec, opt_state)
    other = xrapture.wrap_optimizer(optax.sgd(1e-2, momentum=0.9), lora_spec)
    with self.assertRaisesRegex(ValueError, 'optimizer state of another setup'):
      checkpointing.restore(directory, 1, base, other.init(params))


if __name__ == '__main__':
  absltest.main()
