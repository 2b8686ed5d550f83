"""Tests for experiments/sharding.py on 8 host CPU devices."""

import os

# Eight CPU devices; must happen before jax is imported (conftest.py does the
# same for pytest, Bazel runs this file directly).
os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')

import tempfile  # pylint: disable=g-import-not-at-top,wrong-import-position

from absl.testing import absltest  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import parameterized  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import safetensors.numpy  # pylint: disable=g-import-not-at-top,wrong-import-position
import xrapture  # pylint: disable=g-import-not-at-top,wrong-import-position

import test_utils  # pylint: disable=g-import-not-at-top,wrong-import-position

_ROOT = test_utils.append_repo_root()
from configs import finetune as finetune_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import trainer  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import variants  # pylint: disable=g-import-not-at-top,wrong-import-position

_QUERY = 'blocks/__layer_stack_no_per_layer/block/attn/query'


def smoke_config(**overrides):
  """configs/finetune.py:lora,smoke (a tiny model, a few steps), with ``overrides``."""
  config = finetune_configs.get_config('lora,smoke')
  config.update_from_flattened_dict({'progress_bar': False, **overrides})
  return config


class ShardingTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    if jax.device_count() < 8:
      self.skipTest(f'needs 8 devices, has {jax.device_count()} (XLA_FLAGS was '
                    'set before this test could ask for 8 host devices)')

  @parameterized.parameters(((-1, 1), (8, 1)), ((-1, 2), (4, 2)), ((2, 2), (2, 2)),
                            ((1, -1), (1, 8)))
  def test_make_mesh(self, shape, want):
    mesh = sharding.make_mesh(shape)
    self.assertEqual((mesh.shape['data'], mesh.shape['model']), want)

  @parameterized.parameters(((3, 3), 'needs 9 devices'), ((0, 1), 'positive'),
                            ((-1, -1), 'one -1'), ((-1, 3), 'not a multiple'),
                            ((8,), r'\(data, model\)'))
  def test_impossible_mesh(self, shape, message):
    with self.assertRaisesRegex(ValueError, message):
      sharding.make_mesh(shape)

  def test_lora_weight_leaves_are_sharded_over_model(self):
    config = smoke_config()
    base = lm_model.init_params(config.pretrain.model, 0)
    run = variants.lora(config, lm_model.make_forward(config.pretrain.model), base)
    params = sharding.put_tree(sharding.make_mesh((4, 2)), run.params)
    query = params[_QUERY]['w']
    self.assertIsInstance(query, xrapture.LoraWeight)
    for x in (query.w, query.a, query.b):  # [L, 32, 32], [L, 4, 32], [L, 32, 4]
      self.assertEqual(x.sharding.spec, P(None, None, 'model'))
      self.assertLen(x.addressable_shards, 8)
      self.assertEqual(x.addressable_shards[0].data.shape[-1], x.shape[-1] // 2)
    self.assertEqual(params['head']['b'].sharding.spec, P())  # 1-D: replicated
    np.testing.assert_array_equal(np.asarray(query.a), np.asarray(run.params[_QUERY]['w'].a))

  def test_batch_must_split_over_data(self):
    mesh = sharding.make_mesh((4, 2))
    batch = sharding.put_batch(mesh, np.zeros((8, 16), np.int32))
    self.assertEqual(batch.sharding.spec, P('data'))
    with self.assertRaisesRegex(ValueError, 'not divisible'):
      sharding.put_batch(mesh, np.zeros((6, 16), np.int32))

  def test_sharded_training_equals_single_device(self):
    config = smoke_config(num_steps=6, checkpoint_every=6)
    base = lm_model.init_params(config.pretrain.model, 0)
    forward = lm_model.make_forward(config.pretrain.model)
    data = lm_data.load('docs')
    results, adapters = [], []
    with tempfile.TemporaryDirectory() as tmp:
      for shape in ((1, 1), (4, 2)):
        workdir = os.path.join(tmp, str(shape))
        run = variants.lora(config, forward, base)
        results.append(trainer.train(run, data, config, workdir,
                                     sharding.make_mesh(shape)))
        with open(os.path.join(workdir, 'adapter.safetensors'), 'rb') as f:
          adapters.append(safetensors.numpy.load(f.read()))
    single, sharded = results
    self.assertAlmostEqual(single['val_bpb'], sharded['val_bpb'], delta=1e-4)
    self.assertAlmostEqual(single['test_bpb'], sharded['test_bpb'], delta=1e-4)
    self.assertCountEqual(adapters[1], adapters[0])
    for name in adapters[0]:
      if name.endswith('attn/key/b'):
        # A key bias moves every logit of a query by the same amount, which
        # the softmax removes: its gradient is zero but for rounding, and
        # Adam scales that noise up to full-size steps, different on
        # different meshes (the outputs, compared above, do not see it).
        continue
      np.testing.assert_allclose(adapters[1][name], adapters[0][name],
                                 atol=2e-4, err_msg=name)


if __name__ == '__main__':
  absltest.main()
