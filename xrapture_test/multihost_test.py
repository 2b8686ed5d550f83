"""LoRA training, save_adapter and export_peft across two jax.distributed processes.

Two worker processes on this machine (gloo collectives over loopback, two CPU
devices each) train the same small Haiku model as one process with four
devices, on one 4-device mesh: data-parallel, then with the model axis
spanning the two processes (every kernel and its ``a`` split between them).
Both write the adapter with ``save_adapter`` and ``export_peft`` from every
process. This process compares the runs and loads the files back
(xrapture/_src/io/multihost.py: gather, process 0 writes, the others wait).

The workers are this file, run as a script with ``XRAPTURE_TEST_WORKER`` set.
"""

import os
import sys

# pylint: disable=g-import-not-at-top,wrong-import-position
if os.environ.get("XRAPTURE_TEST_WORKER"):  # before jax: join the group first
  from xrapture._src.testing import multiprocess as _mp
  _mp.initialize_from_env()

import functools
import tempfile

from absl.testing import absltest
import haiku as hk
import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import xrapture
from xrapture._src.testing import multiprocess
# pylint: enable=g-import-not-at-top,wrong-import-position

IN, HIDDEN, OUT, BATCH, STEPS = 8, 16, 4, 8, 3
NAME_MAP = {"mlp/~/linear_0/w": "0", "mlp/~/linear_1/w": "2"}
LAYOUTS = ("data_parallel", "model_across_processes")
TIMEOUT_S = 240


def _forward(x):
  return hk.nets.MLP([HIDDEN, OUT], activation=jnp.tanh, name="mlp")(x)


def _model():
  config = xrapture.default_config()
  config.rank, config.alpha = 2, 4.0
  config.targets = (r"mlp/~/linear_\d/w",)
  return xrapture.transform(_forward, config)


def _data():
  rng = np.random.default_rng(0)
  x = rng.normal(size=(BATCH, IN)).astype(np.float32)
  y = rng.normal(size=(BATCH, OUT)).astype(np.float32)
  return x, y


@functools.cache
def _base_and_adapted():
  """Base params and adapted ones with nonzero b (so both factors train)."""
  model = _model()
  x, _ = _data()
  base = jax.jit(model.init)(jax.random.PRNGKey(0), x)
  lora_spec = model.lora_spec(base)

  @jax.jit
  def adapt(rng, base):
    params = model.adapt(rng, base)
    return jax.tree.map(
        lambda p: p.replace(b=0.1 * jnp.ones_like(p.b)) if isinstance(p, xrapture.LoraWeight)
        else p, params, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))

  return model, base, lora_spec, adapt(jax.random.PRNGKey(1), base)


# ----------------------------------------------------------------------------
# The worker (runs in each process).


def _mesh(layout):
  # jax.devices() lists process 0's devices first: rows are processes.
  devices = np.array(jax.devices()).reshape(2, 2)
  if layout == "data_parallel":
    return Mesh(devices.reshape(4, 1), ("data", "model"))
  # Columns pair a device of process 0 with one of process 1: "model" spans both.
  return Mesh(devices.T, ("data", "model"))


def _put(x, mesh, spec):
  """A global array from a host value every process holds."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec),
                                      lambda index: x[index])


def _place(tree, mesh, spec_of):
  """LoraWeight fields placed by ``spec_of(field)``, other leaves replicated."""
  def one(leaf):
    if isinstance(leaf, xrapture.LoraWeight):
      return leaf.replace(**{k: _put(getattr(leaf, k), mesh, spec_of(k))
                             for k in ("w", "a", "b")})
    return _put(leaf, mesh, P())
  return jax.tree.map(one, tree, is_leaf=lambda p: isinstance(p, xrapture.LoraWeight))


def _train(layout, out_dir):
  model, _, lora_spec, params = _base_and_adapted()
  mesh = _mesh(layout)
  # Model axis: w [in, out] and a [r, out] split along out; b [in, r] whole.
  model_axis = "model" if layout != "data_parallel" else None
  params = _place(params, mesh, lambda k: P(None, model_axis) if k in ("w", "a") else P())
  x, y = (_put(v, mesh, P("data")) for v in _data())  # batch split over "data"
  tx = xrapture.wrap_optimizer(optax.adam(3e-2), lora_spec)
  opt_state = jax.jit(tx.init)(params)

  @jax.jit
  def step(params, opt_state, x, y):
    loss_fn = lambda p: jnp.mean((model.apply(p, None, x) - y) ** 2)
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for _ in range(STEPS):
    params, opt_state, loss = step(params, opt_state, x, y)
    losses.append(loss)
  if layout != "data_parallel":
    a = params["mlp/~/linear_0"]["w"].a
    assert not a.is_fully_addressable or jax.process_count() == 1, a.sharding
  outputs = jax.jit(model.apply)(params, None, x)
  xrapture.save_adapter(os.path.join(out_dir, f"{layout}.safetensors"), params, lora_spec)
  xrapture.export_peft(os.path.join(out_dir, f"{layout}_peft"), params, None, NAME_MAP)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  gathered = multihost_utils.process_allgather(
      dict(losses=jnp.stack(losses), outputs=outputs), tiled=True)
  if jax.process_index() == 0:
    np.savez(os.path.join(out_dir, f"{layout}.npz"), **gathered)


def _worker_main():
  out_dir = os.environ["XRAPTURE_TEST_OUT"]
  for layout in LAYOUTS:
    _train(layout, out_dir)
  print(f"worker {jax.process_index()} of {jax.process_count()} done", flush=True)


# ----------------------------------------------------------------------------
# The tests (run in this process).


def _run_workers(num_processes, local_devices, out_dir):
  port = multiprocess.free_port()
  envs = [multiprocess.worker_env(i, num_processes, port, local_devices,
                                  extra={"XRAPTURE_TEST_WORKER": "1",
                                         "XRAPTURE_TEST_OUT": out_dir})
          for i in range(num_processes)]
  argv = multiprocess.python_command(os.path.abspath(__file__))
  return multiprocess.run_group([argv] * num_processes, envs, timeout_s=TIMEOUT_S)


class MultiHostTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls._tmp = tempfile.TemporaryDirectory()
    cls.one = os.path.join(cls._tmp.name, "one_process")
    cls.two = os.path.join(cls._tmp.name, "two_processes")
    os.makedirs(cls.one)
    os.makedirs(cls.two)
    # The two runs go one after the other: on a 2-core machine, three
    # compiling processes at once take longer than the sum.
    multiprocess.check(_run_workers(1, 4, cls.one))
    multiprocess.check(_run_workers(2, 2, cls.two))

  @classmethod
  def tearDownClass(cls):
    cls._tmp.cleanup()
    super().tearDownClass()

  def _results(self, run, layout):
    with np.load(os.path.join(run, f"{layout}.npz")) as f:
      return dict(f)

  def test_training_equals_one_process(self):
    for layout in LAYOUTS:
      with self.subTest(layout):
        one, two = self._results(self.one, layout), self._results(self.two, layout)
        self.assertLess(one["losses"][-1], one["losses"][0])  # it trained
        np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
        np.testing.assert_allclose(two["outputs"], one["outputs"], rtol=1e-5, atol=1e-6)

  def test_layouts_agree(self):
    # Positive control of the comparison: the two layouts compute the same.
    a, b = (self._results(self.one, layout) for layout in LAYOUTS)
    np.testing.assert_allclose(a["outputs"], b["outputs"], rtol=1e-5, atol=1e-6)

  def test_files_written_from_every_process_load_back(self):
    model, base, _, _ = _base_and_adapted()
    x, _ = _data()
    for layout in LAYOUTS:
      with self.subTest(layout):
        expected = self._results(self.two, layout)["outputs"]
        params = xrapture.load_adapter(os.path.join(self.two, f"{layout}.safetensors"), base)
        np.testing.assert_allclose(model.apply(params, None, x), expected,
                                   rtol=1e-5, atol=1e-6)
        params = xrapture.import_peft(os.path.join(self.two, f"{layout}_peft"), base,
                                      NAME_MAP)
        np.testing.assert_allclose(model.apply(params, None, x), expected,
                                   rtol=1e-5, atol=1e-6)
    # Written whole, once: no temporary file left behind.
    names = sorted(os.listdir(self.two))
    self.assertEqual([n for n in names if n.startswith(".tmp")], [])
    self.assertEqual(sorted(os.listdir(os.path.join(self.two, f"{LAYOUTS[1]}_peft"))),
                     ["adapter_config.json", "adapter_model.safetensors"])


# Run as a worker (see the module docstring), or as the test.
if __name__ == "__main__" and os.environ.get("XRAPTURE_TEST_WORKER"):
  _worker_main()
  sys.exit(0)

if __name__ == "__main__":
  absltest.main()
