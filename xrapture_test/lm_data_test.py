"""Tests for experiments/lm_data.py: the offline corpora and their splits."""


from absl.testing import absltest
from absl.testing import parameterized
import numpy as np

import test_utils

test_utils.append_repo_root()
from experiments import lm_data  # pylint: disable=g-import-not-at-top,wrong-import-position


class SplitTest(absltest.TestCase):

  def test_split_depends_only_on_the_name(self):
    self.assertEqual(lm_data.split_of('json/decoder.py'),
                     lm_data.split_of('json/decoder.py'))
    splits = [lm_data.split_of(f'doc{i}') for i in range(2000)]
    fractions = [splits.count(s) / len(splits) for s in lm_data.SPLITS]
    np.testing.assert_allclose(fractions, [0.8, 0.1, 0.1], atol=0.03)


class CorpusTest(parameterized.TestCase):

  @parameterized.parameters(*lm_data.DOMAINS)
  def test_splits_are_disjoint_and_nonempty(self, domain):
    corpus = lm_data.load(domain)
    names = [set(corpus.names[s]) for s in lm_data.SPLITS]
    self.assertEmpty(names[0] & names[1])
    self.assertEmpty(names[0] & names[2])
    self.assertEmpty(names[1] & names[2])
    for split in lm_data.SPLITS:
      self.assertGreater(corpus.splits[split].size, 4096)
      self.assertEqual(corpus.splits[split].dtype, np.uint8)
      # One separator after every document.
      self.assertEqual(int((corpus.splits[split] == lm_data.SEPARATOR).sum()),
                       len(corpus.names[split]))
    for name in corpus.names['val']:
      self.assertEqual(lm_data.split_of(name), 'val')

  def test_domains_differ(self):
    code, docs = lm_data.load('code'), lm_data.load('docs')
    self.assertTrue(all(n.endswith('.py') for n in code.names['train']))
    self.assertFalse(any('/test/' in n or n.startswith('test/')
                         for n in code.names['train']))
    self.assertIn('assert', sum((docs.names[s] for s in lm_data.SPLITS), ()))

  def test_unknown_domain(self):
    with self.assertRaisesRegex(ValueError, 'Unknown data domain'):
      lm_data.load('wikipedia')


class BatchTest(absltest.TestCase):

  def test_train_batch_is_a_function_of_seed_and_step(self):
    data = lm_data.load('docs').splits['train']
    a = lm_data.train_batch(data, 0, 7, 4, 16)
    self.assertEqual(a.shape, (4, 16))
    self.assertEqual(a.dtype, np.int32)
    np.testing.assert_array_equal(a, lm_data.train_batch(data, 0, 7, 4, 16))
    self.assertFalse(np.array_equal(a, lm_data.train_batch(data, 0, 8, 4, 16)))
    self.assertFalse(np.array_equal(a, lm_data.train_batch(data, 1, 7, 4, 16)))

  def test_eval_batches(self):
    data = (np.arange(1000) % 256).astype(np.uint8)
    every = lm_data.eval_batches(data, 4, 10)
    self.assertLen(every, 25)  # 100 non-overlapping windows
    np.testing.assert_array_equal(every[0][1], np.arange(10, 20))
    some = lm_data.eval_batches(data, 4, 10, num_batches=2)
    self.assertLen(some, 2)
    self.assertEqual(some[-1][-1][-1], data[-1])  # spread to the end


if __name__ == '__main__':
  absltest.main()
