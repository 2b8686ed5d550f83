"""Tests for experiments/variants.py: what each fine-tuning method trains."""


from absl.testing import absltest
import jax
import numpy as np
import optax
import xrapture

import test_utils

_ROOT = test_utils.append_repo_root()
from configs import finetune as finetune_configs  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import lm_model  # pylint: disable=g-import-not-at-top,wrong-import-position
from experiments import variants  # pylint: disable=g-import-not-at-top,wrong-import-position

# Where hk.layer_stack puts the blocks' parameters: each has a leading
# [num_layers] axis, so a bias or LayerNorm scale is [L, D].
_STACK = 'blocks/__layer_stack_no_per_layer/block/'


def _flat(params):
  flat, _ = jax.tree_util.tree_flatten_with_path(params, is_leaf=xrapture.is_implicit)
  return {'/'.join(str(k.key) for k in path): leaf for path, leaf in flat}


def _one_step(run, tokens):
  """One training step of ``run``, as experiments/trainer.py takes it."""
  def loss_fn(params):
    return lm_model.next_token_loss(run.apply(params, None, tokens), tokens)
  grads = jax.grad(loss_fn)(run.params)
  updates, _ = run.tx.update(grads, run.tx.init(run.params), run.params)
  return optax.apply_updates(run.params, updates)


class LoraTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    # No warmup: the first step has the full learning rate, not 0.
    self.config = finetune_configs.get_config('lora,smoke')
    self.config.warmup_steps = 0
    self.base = lm_model.init_params(self.config.pretrain.model, 0)
    self.forward = lm_model.make_forward(self.config.pretrain.model)
    data = lm_data.load('docs')
    self.tokens = lm_data.train_batch(data.splits['train'], 0, 0, 2, self.config.seq_len)

  def _vectors_moved(self, tune_vectors):
    """{path: whether one step changed it} for the layer stack's [L, D] vectors."""
    self.config.lora.tune_vectors = tune_vectors
    run = variants.lora(self.config, self.forward, self.base)
    before = _flat(run.params)
    vectors = {p: v for p, v in before.items()
               if p.startswith(_STACK) and not isinstance(v, xrapture.LoraWeight)
               and np.ndim(v) == 2}
    # Biases of attention and MLP, LayerNorm scales and offsets.
    self.assertGreaterEqual(len(vectors), 8, sorted(before))
    lora_spec = _flat(run.lora_spec)
    want = xrapture.LORA_FULL if tune_vectors else xrapture.LORA_FREEZE
    self.assertEqual({p: lora_spec[p] for p in vectors}, {p: want for p in vectors})
    after = _flat(_one_step(run, self.tokens))
    return {p: not np.array_equal(after[p], v) for p, v in vectors.items()}

  def test_tune_vectors_trains_the_layer_stack_vectors(self):
    moved = self._vectors_moved(tune_vectors=True)
    self.assertEqual(moved, {p: True for p in moved})

  def test_without_tune_vectors_they_stay_frozen(self):
    # The control: the same step leaves them as they were.
    moved = self._vectors_moved(tune_vectors=False)
    self.assertEqual(moved, {p: False for p in moved})


if __name__ == '__main__':
  absltest.main()
