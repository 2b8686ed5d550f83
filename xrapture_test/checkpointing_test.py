"""Tests for experiments/checkpointing.py: orbax checkpoints, durable and checked."""

import glob
import os

# Eight CPU devices for the other-mesh test; must happen before jax is
# imported (conftest.py does the same for pytest, Bazel runs this file directly).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

from unittest import mock  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl.testing import absltest  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import parameterized  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import optax  # pylint: disable=g-import-not-at-top,wrong-import-position
import xrapture  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

test_utils.append_repo_root()
from experiments import checkpointing  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position


def _setup():
  """Base params, adapted params with one LoraWeight, its lora spec and Adam state."""
  rng = np.random.default_rng(0)
  base = {'linear': {'w': jnp.asarray(rng.normal(size=(6, 8)), jnp.float32),
                     'b': jnp.zeros(8)},
          'head': {'w': jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)}}
  lora_spec = {'linear': {'w': 2, 'b': xrapture.LORA_FREEZE},
               'head': {'w': xrapture.LORA_FULL}}
  params = {'linear': {'w': xrapture.LoraWeight(
      base['linear']['w'], jnp.asarray(rng.normal(size=(2, 8)), jnp.float32),
      jnp.asarray(rng.normal(size=(6, 2)), jnp.float32), alpha=4.0),
                       'b': base['linear']['b']},
            'head': {'w': base['head']['w'] + 1.0}}
  tx = xrapture.wrap_optimizer(optax.adam(1e-2), lora_spec)
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  return base, params, lora_spec, tx, opt_state


def _scaled(tree, factor):
  return jax.tree.map(lambda x: x * factor if jnp.issubdtype(x.dtype, jnp.floating) else x,
                      tree)


class CheckpointingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.base, self.params, self.lora_spec, self.tx, self.opt_state = _setup()
    self.mesh = sharding.make_mesh((1, 1))
    self.directory = os.path.join(test_utils.tmpdir(self), 'checkpoints')

  def checkpoints(self, keep=3):
    checkpoints = checkpointing.Checkpoints(self.directory, keep)
    self.addCleanup(checkpoints.close)
    return checkpoints

  def save_two(self):
    """Step 1 holds the setup's state, step 2 the same doubled."""
    checkpoints = self.checkpoints()
    checkpoints.save(1, self.params, self.lora_spec, self.opt_state, extra={'seed': 1})
    checkpoints.save(2, _scaled(self.params, 2.0), self.lora_spec,
                     _scaled(self.opt_state, 2.0), extra={'seed': 2})
    checkpoints.close()

  def restore_latest(self):
    return self.checkpoints().restore_latest(
        self.params, self.lora_spec, self.tx.init(self.params), self.mesh)

  def assert_state(self, params, opt_state, factor):
    """The trainable leaves and optimizer state are the setup's, times ``factor``."""
    want_params, want_opt = _scaled(self.params, factor), _scaled(self.opt_state, factor)
    got = checkpointing.trainable_leaves(params, self.lora_spec)
    want = checkpointing.trainable_leaves(want_params, self.lora_spec)
    self.assertEqual(list(got), list(want))
    for path in want:
      np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(want[path]), path)
    for got_leaf, want_leaf in zip(jax.tree.leaves(opt_state), jax.tree.leaves(want_opt)):
      np.testing.assert_array_equal(np.asarray(got_leaf), np.asarray(want_leaf))
    # The frozen leaves are the base given to restore, not read from the file.
    np.testing.assert_array_equal(np.asarray(params['linear']['w'].w),
                                  np.asarray(self.base['linear']['w']))

  def test_round_trip_is_exact(self):
    checkpoints = self.checkpoints()
    checkpoints.save(5, self.params, self.lora_spec, self.opt_state, extra={'seed': 3})
    self.assertEqual(checkpoints.latest_step(), 5)
    step, params, opt_state, meta = self.restore_latest()
    self.assertEqual((step, meta['step'], meta['seed']), (5, 5, 3))
    self.assertIsInstance(params['linear']['w'], xrapture.LoraWeight)
    self.assertEqual(params['linear']['w'].alpha, 4.0)
    self.assert_state(params, opt_state, 1.0)

  def test_only_the_trainable_part_is_written(self):
    self.checkpoints().save(1, self.params, self.lora_spec, self.opt_state)
    meta = self.checkpoints().read_meta(1)
    self.assertEqual([p for p, _, _ in meta['trainable']],
                     ["['head']['w']", "['linear']['w'].a", "['linear']['w'].b"])

  def test_keeps_the_newest(self):
    checkpoints = self.checkpoints(keep=2)
    for step in (1, 2, 3, 4):
      checkpoints.save(step, self.params, self.lora_spec, self.opt_state)
    self.assertEqual(checkpoints.all_steps(), [3, 4])
    self.assertCountEqual(os.listdir(self.directory), ['3', '4'])

  def test_restores_onto_another_mesh(self):
    if jax.device_count() < 8:
      self.skipTest(f'needs 8 devices, has {jax.device_count()}')
    saved_on = sharding.make_mesh((4, 2))
    params, opt_state = sharding.put_tree(saved_on, (self.params, self.opt_state))
    self.assertEqual(params['head']['w'].sharding.spec, jax.sharding.PartitionSpec(None, 'model'))
    self.checkpoints().save(1, params, self.lora_spec, opt_state)
    for shape in ((1, 1), (2, 4)):
      mesh = sharding.make_mesh(shape)
      _, got, got_opt, _ = self.checkpoints().restore_latest(
          self.params, self.lora_spec, self.tx.init(self.params), mesh)
      self.assert_state(got, got_opt, 1.0)
      for leaf in (got['head']['w'], got['linear']['w'].a, got['linear']['w'].b):
        self.assertEqual(leaf.sharding, sharding.leaf_sharding(mesh, leaf))

  def test_a_failed_write_leaves_no_step_and_its_leftovers_are_cleaned(self):
    checkpoints = self.checkpoints()
    checkpoints.save(1, self.params, self.lora_spec, self.opt_state)
    with mock.patch.object(checkpointing.atomic, 'fsync',
                           side_effect=OSError('disk full')):
      with self.assertRaisesRegex(OSError, 'disk full'):
        checkpoints.save(2, self.params, self.lora_spec, self.opt_state)
    checkpoints.close()
    self.assertLen(os.listdir(self.directory), 2)  # step 1 and the temporary one
    self.assertEqual(self.checkpoints().all_steps(), [1])
    self.assertEqual(os.listdir(self.directory), ['1'])  # cleaned on opening
    self.assertEqual(self.restore_latest()[0], 1)

  def test_files_and_directories_are_fsynced_before_the_rename(self):
    fsynced = []
    real_fsync = os.fsync

    def recording_fsync(fd):
      fsynced.append(os.readlink(f'/proc/self/fd/{fd}'))
      return real_fsync(fd)
    with mock.patch.object(os, 'fsync', recording_fsync):
      self.checkpoints().save(7, self.params, self.lora_spec, self.opt_state)
    final = os.path.join(self.directory, '7')
    tmp_names = {os.path.relpath(p, self.directory).split(os.sep)[0] for p in fsynced
                 if p.startswith(self.directory + os.sep)} - {'7'}
    self.assertLen(tmp_names, 1, fsynced)  # the one temporary directory
    tmp = os.path.join(self.directory, tmp_names.pop())
    self.assertFalse(os.path.exists(tmp))
    for root, _, files in os.walk(final):
      for name in files + ['.']:
        rel = os.path.normpath(os.path.relpath(os.path.join(root, name), final))
        fsynced_before_rename = os.path.normpath(os.path.join(tmp, rel)) in fsynced
        if (rel, fsynced_before_rename) == ('commit_success.txt', False):
          # orbax writes this marker during the rename itself: fsynced after.
          self.assertIn(os.path.join(final, rel), fsynced)
          continue
        self.assertTrue(fsynced_before_rename, rel)
    self.assertEqual(fsynced[-1], self.directory)  # the rename itself

  @parameterized.named_parameters(
      ('empty_files', 'every', 'empty'), ('truncated_files', 'every', 'half'),
      ('empty_tree_metadata', 'state/_METADATA', 'empty'),
      ('truncated_array_metadata', 'state/array_metadatas/process_0', 'half'),
      ('truncated_manifest', 'state/manifest.ocdbt', 'half'),
      ('truncated_data', 'state/d/*', 'half'),
      ('empty_meta', 'meta/metadata', 'empty'), ('missing_meta', 'meta/metadata', 'remove'))
  def test_a_corrupt_newest_step_falls_back_to_the_newest_intact_one(self, which, how):
    self.save_two()
    step, params, opt_state, _ = self.restore_latest()  # positive control
    self.assertEqual(step, 2)
    self.assert_state(params, opt_state, 2.0)
    pattern = '**' if which == 'every' else which
    files = [f for f in glob.glob(os.path.join(self.directory, '2', pattern), recursive=True)
             if os.path.isfile(f)]
    self.assertNotEmpty(files)
    for path in files:
      if how == 'remove':
        os.remove(path)
      else:
        os.truncate(path, os.path.getsize(path) // 2 if how == 'half' else 0)

    with self.assertLogs(level='WARNING') as logs:
      step, params, opt_state, meta = self.restore_latest()
    self.assertEqual((step, meta['seed']), (1, 1))
    self.assert_state(params, opt_state, 1.0)
    self.assertRegex('\n'.join(logs.output), r'/2 does not read back')
    self.assertEqual(self.checkpoints().all_steps(), [1])  # the corrupt one is gone

  def test_no_intact_step_is_an_error_and_deletes_nothing(self):
    self.save_two()
    for path in glob.glob(os.path.join(self.directory, '*', 'meta', 'metadata')):
      open(path, 'w').close()
    with self.assertRaisesRegex(checkpointing.UnreadableCheckpointError,
                                'No checkpoint in .* reads back(.|\n)*Delete that directory'):
      self.restore_latest()
    self.assertEqual(self.checkpoints().all_steps(), [1, 2])

  def test_other_optimizer_is_refused(self):
    self.checkpoints().save(1, self.params, self.lora_spec, self.opt_state)
    other = xrapture.wrap_optimizer(optax.sgd(1e-2, momentum=0.9), self.lora_spec)
    with self.assertRaisesRegex(ValueError, 'optimizer state of another setup'):
      self.checkpoints().restore_latest(self.params, self.lora_spec,
                                        other.init(self.params), self.mesh)

  def test_other_rank_is_refused(self):
    self.checkpoints().save(1, self.params, self.lora_spec, self.opt_state)
    w = self.params['linear']['w']
    params = {**self.params, 'linear': {**self.params['linear'], 'w': xrapture.LoraWeight(
        w.w, jnp.zeros((3, 8)), jnp.zeros((6, 3)), alpha=4.0)}}
    lora_spec = {**self.lora_spec, 'linear': {'w': 3, 'b': xrapture.LORA_FREEZE}}
    tx = xrapture.wrap_optimizer(optax.adam(1e-2), lora_spec)
    with self.assertRaisesRegex(ValueError, r'trainable parameters of another setup.*\[3, 8\]'):
      self.checkpoints().restore_latest(params, lora_spec, tx.init(params), self.mesh)


if __name__ == '__main__':
  absltest.main()
