"""The benchmark scripts run end to end on a toy model (no timing asserted)."""

import json
import os
import subprocess
import sys
import tempfile
import textwrap

from absl import app
from absl import flags
from absl.testing import absltest
from absl.testing import flagsaver
import jax
import numpy as np
from xrapture._src.testing import optional

import test_utils

test_utils.append_repo_root()

from benchmarks import breakdown  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import gemm  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import first_step  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import lm  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import memory  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import mixed_batch  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import profile  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import qlora  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import quant  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import remat  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import run_all  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import scaling  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import step_time  # pylint: disable=g-import-not-at-top,wrong-import-position
from benchmarks import variants  # pylint: disable=g-import-not-at-top,wrong-import-position

# steady_allocator=False: the test process keeps glibc's default (its own test below).
_TOY = dict(d_model=32, head_dim=16, n_layers=1, vocab=32, seq_len=8, batch=2,
            rank=2, rounds=2, warmup=1, steady_allocator=False)


peft, torch = optional.modules("peft", "torch")


def setUpModule():
  if not flags.FLAGS.is_parsed():  # under pytest: the defaults stand
    flags.FLAGS.mark_as_parsed()


class BenchmarksSmokeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.out_dir = tempfile.mkdtemp()

  def _step_time(self, with_peft):
    out = os.path.join(self.out_dir, "step_time.json")
    with flagsaver.flagsaver(out=out, compile_reps=1, peft=with_peft, **_TOY):
      step_time.main([])
    with open(out) as f:
      results = json.load(f)
    self.assertTrue(results["agreement"]["ok"], results["agreement"])
    return out, results

  @absltest.skipIf(peft is None, optional.MISSING)
  def test_step_time_agrees_with_peft(self):
    # The same losses as HuggingFace PEFT's model (the agreement check), and
    # its row in the table.
    _, results = self._step_time(with_peft=True)
    self.assertIn("peft_vs_xrapture_max_rel", results["agreement"])
    self.assertIn("xrapture/peft", results["step_ratios"])

  def test_step_time_writes_agreeing_results(self):
    out, results = self._step_time(with_peft=False)
    self.assertIn("xrapture/bound", results["step_ratios"])
    self.assertIn("merged/base", results["inference_ratios"])
    self.assertLess(results["params"]["opt_state_bytes"]["xrapture"],
                    results["params"]["opt_state_bytes"]["full"])
    self.assertTrue(os.path.exists(out[:-len(".json")] + ".md"))

  def test_scaling_table_and_plot(self):
    out = os.path.join(self.out_dir, "scaling.json")
    with flagsaver.flagsaver(out=out, widths=["16"], ranks=["2"],
                             naive=False, flat_optimizer=True, **_TOY):
      scaling.main([])
    self.assertTrue(os.path.getsize(out[:-len(".json")] + ".png") > 0)
    with open(out[:-len(".json")] + ".md") as f:
      self.assertIn("optax.flatten ÷ plain Adam", f.read())
    with open(out) as f:
      point = json.load(f)["widths"]["16"]["points"][0]
    self.assertEqual({"xrapture", "xrapture_flat", "flat_over_plain"} - set(point), set())

  @absltest.skipIf(torch is None, optional.MISSING)
  def test_gemm_times_the_same_products(self):
    # The callables it times compute a block's six products both ways (x @ w
    # and ∂y @ wᵀ), checked here against numpy's.
    ops = gemm.operands(16, tokens=8)
    self.assertEqual([w.shape for _, _, w in ops], [(16, 16)] * 4 + [(16, 64), (64, 16)])
    for timed in (gemm.jax_products(ops), gemm.torch_products(ops)):
      products = timed()
      self.assertLen(products, 6)
      for (x, g, w), (forward, backward) in zip(ops, products):
        np.testing.assert_allclose(np.asarray(forward), x @ w, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(backward), g @ w.T, rtol=1e-5, atol=1e-5)
    out = os.path.join(self.out_dir, "gemm.json")
    with flagsaver.flagsaver(out=out, widths=["16"], **_TOY):
      gemm.main([])
    with open(out) as f:
      point = json.load(f)["widths"]["16"]
    self.assertLess(point["max_relative_difference"], 1e-5)
    self.assertEqual(point["torch_over_xla"]["n"], _TOY["rounds"])
    tokens = _TOY["batch"] * _TOY["seq_len"]
    self.assertAlmostEqual(point["gflop"], 2 * 2 * tokens * (4 * 16 * 16 + 2 * 16 * 64) / 1e9)
    with open(out[:-len(".json")] + ".md") as f:
      self.assertIn("torch ÷ XLA", f.read())

  def test_steady_allocator_stops_the_page_faults(self):
    # Freed memory that glibc hands back to the kernel is faulted in again on
    # the next use. Two ways, each allocated, written and freed five times:
    # * in the main thread, a 48 MiB buffer (over the largest mmap threshold,
    #   32 MiB): fresh pages every time by default;
    # * in another thread (as XLA's workers allocate), 40 + 40 MiB live at
    #   once, past one 64 MiB heap of the thread's own arena: glibc unmaps the
    #   second heap once it is wholly free, even with mmap off.
    # One process each: glibc's default; mmap off and trimming down only (the
    # other thread still faults); and steady_allocator() (as the timing scripts
    # call it, before any thread has an arena): neither faults.
    script = textwrap.dedent("""
        import ctypes, resource, sys, threading
        import numpy as np
        sys.path.insert(0, sys.argv[1])
        from benchmarks import timing
        if sys.argv[2] == "steady":
          print(timing.steady_allocator() is not None)
        elif sys.argv[2] == "mmap_off":
          libc = ctypes.CDLL("libc.so.6")
          print(bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 2**31 - 1)))
        else:
          print(True)
        def main_thread():
          for _ in range(5):
            np.ones(12 * 2**20, np.float32).sum()
        def other_thread():
          for _ in range(5):
            a, b = np.ones(10 * 2**20, np.float32), np.ones(10 * 2**20, np.float32)
            (a.sum(), b.sum())
            del a, b
        def faults(work):
          start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
          work()
          return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start
        def counts():
          out = [faults(main_thread)]
          t = threading.Thread(target=lambda: out.append(faults(other_thread)))
          t.start()
          t.join()
          return out
        counts()   # the heaps grow once
        print(*counts())
        """)
    runs = {}
    for mode in ("default", "mmap_off", "steady"):
      runs[mode] = subprocess.run(
          [sys.executable, "-c", script, test_utils.append_repo_root(), mode],
          capture_output=True, text=True, check=True).stdout.split()
    if runs["steady"][0] == "False" or runs["mmap_off"][0] == "False":
      self.skipTest("not glibc")
    counts = {mode: [int(n) for n in out[1:]] for mode, out in runs.items()}
    # At least ~20 faults a time for 40-48 MiB: one per 2 MiB huge page, or
    # one per 4 KiB page without them.
    self.assertGreater(counts["default"][0], 5 * 20, "main thread, default")
    self.assertGreater(counts["default"][1], 5 * 20, "other thread, default")
    self.assertLess(counts["mmap_off"][0], counts["default"][0] // 10, "main thread, mmap off")
    self.assertGreater(counts["mmap_off"][1], 5 * 20, "other thread, mmap off")
    self.assertLess(counts["steady"][0], counts["default"][0] // 10, "main thread, steady")
    self.assertLess(counts["steady"][1], counts["mmap_off"][1] // 10, "other thread, steady")

  def test_breakdown_restores_the_rule(self):
    out = os.path.join(self.out_dir, "breakdown.json")
    with flagsaver.flagsaver(out=out, **_TOY):
      breakdown.main([])
    with open(out) as f:
      results = json.load(f)
    self.assertEqual(results["variants"], list(breakdown.VARIANTS))
    lora_matmul = breakdown.dot_general.lora_matmul
    self.assertIs(lora_matmul.fwd, breakdown.dot_general._lora_matmul_fwd)
    self.assertIs(lora_matmul.bwd, breakdown.dot_general._lora_matmul_bwd)
    # The swapped rule is the one a step runs: without ∂b, Adam leaves b as it was.
    cfg = lm.Config(d_model=32, n_layers=1, n_heads=2, vocab=32, seq_len=8, batch=2, rank=2,
                    alpha=4.0)
    batch = lm.batch(cfg)
    base = lm.dense_model(cfg).init(jax.random.PRNGKey(0), batch[0])
    adapted = variants.adapted_params(cfg, base)
    with breakdown.rule(*breakdown.RULES["all but ∂b"]):
      step = variants.xrapture_variant(cfg, base, adapted, batch)
      step.step()
    after = step.state[0]["layer_0/query"]["w"]
    np.testing.assert_array_equal(after.b, adapted["layer_0/query"]["w"].b)
    self.assertFalse(np.array_equal(after.a, adapted["layer_0/query"]["w"].a))
    # The flattened-Adam row trains what the plain row trains, its Adam on one vector.
    plain, flat = (variants.xrapture_variant(cfg, base, adapted, batch, flat_optimizer=f)
                   for f in (False, True))
    moments = [x.shape for x in jax.tree.leaves(flat.state[1]) if x.ndim]
    self.assertEqual(moments, [(plain.trainable,)] * 2)
    np.testing.assert_allclose([flat.step() for _ in range(3)],
                               [plain.step() for _ in range(3)], rtol=1e-6)

  def test_profile_sorts_every_traced_op(self):
    out = os.path.join(self.out_dir, "profile.json")
    # rank 3: no other size of the toy model is 3 (heads and batch are 2).
    with flagsaver.flagsaver(out=out, profiled_steps=2, **dict(_TOY, rank=3)):
      profile.main([])
    with open(out) as f:
      r = json.load(f)
    for name in ("bound", "xrapture"):
      # Every op of the compiled program is found in XLA's trace, once a step.
      self.assertEqual(r[name]["ops_not_traced_once_a_step"], {}, name)
      self.assertEqual(r[name]["ops_traced_per_step"], r[name]["ops_in_program"], name)
    rank = r["xrapture"]["categories"]["rank products"]
    self.assertEqual(rank["ops"], r["xrapture"]["program_ops_by_category"]["rank products"])
    # The rank products' FLOPs, counted from the rule: per kernel [K, N] and 16
    # tokens, x·b, u·a, ∂y·aᵀ, ∂u·bᵀ, uᵀ·∂y and xᵀ·∂u, each 2·16·r·(K or N);
    # less ∂u·bᵀ of the first block's query, key and value (no gradient is
    # wanted below them).
    d, tokens, r_ = 32, 16, 3
    kernels = [(d, d)] * 4 + [(d, 4 * d), (4 * d, d)]
    flops = sum(2 * tokens * r_ * 3 * (k + n) for k, n in kernels) - 3 * 2 * tokens * r_ * d
    self.assertAlmostEqual(rank["gflop"] * 1e9, flops, delta=1e-3)
    # The dense products are the bound's but for the input gradient of the first
    # block's query, key and value (∂y·wᵀ, [16, d]·[d, d] each), which the bound
    # needs (it differentiates the embedded input) and xrapture's step does not.
    dense = {n: r[n]["categories"]["dense products"]["gflop"] * 1e9 for n in ("bound", "xrapture")}
    self.assertAlmostEqual(dense["bound"] - dense["xrapture"], 3 * 2 * tokens * d * d, delta=1e-3)
    self.assertIn("| rank products | 0 | 0.00 | ", profile.markdown(r))
    with self.assertRaisesRegex(app.UsageError, r"--rank=2 equals the model's batch, heads"):
      profile.run(lm.Config(d_model=32, n_layers=1, n_heads=2, vocab=32, seq_len=8, batch=2,
                            rank=2, alpha=4.0), steps=1)

  def test_profile_parses_hlo_by_each_dot_s_own_shapes(self):
    hlo = textwrap.dedent("""\
        HloModule m

        %fused_dense (p0: f32[16,32], p1: f32[32,32], p2: f32[16,3]) -> f32[16,32] {
          %p0 = f32[16,32]{1,0} parameter(0)
          %p1 = f32[32,32]{1,0} parameter(1)
          %p2 = f32[16,3]{1,0} parameter(2)
          ROOT %d = f32[16,32] dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
        }

        %fused_pair (q0: f32[16,32], q1: f32[32,3]) -> (f32[16,3], f32[16,3]) {
          %q0 = f32[16,32]{1,0} parameter(0)
          %q1 = f32[32,3]{1,0} parameter(1)
          %dot.2 = f32[16,3]{1,0} dot(%q0, %q1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
          %negate.1 = f32[16,3]{1,0} negate(%dot.2)
          ROOT %tuple.1 = (f32[16,3]{1,0}, f32[16,3]{1,0}) tuple(%dot.2, %negate.1)
        }

        ENTRY %main (a: f32[16,32], w: f32[32,32], b: f32[32,3], u: f32[16,3]) -> f32[16,32] {
          %a = f32[16,32]{1,0} parameter(0)
          %w = f32[32,32]{1,0} parameter(1)
          %b = f32[32,3]{1,0} parameter(2)
          %u = f32[16,3]{1,0} parameter(3)
          %fusion.1 = f32[16,32]{1,0} fusion(%a, %w, %u), kind=kCustom, calls=%fused_dense
          %fusion.2 = (f32[16,3]{1,0}, f32[16,3]{1,0}) fusion(%a, %b), kind=kLoop, calls=%fused_pair
          %dot.3 = f32[3,32]{1,0} dot(%u, %a), lhs_contracting_dims={0}, rhs_contracting_dims={0}
          %copy.1 = f32[32,3]{0,1} copy(%b)
          ROOT %add.1 = f32[16,32]{1,0} add(%fusion.1, %a)
        }
        """)
    ops = profile.parse_hlo(hlo)
    self.assertEqual(set(ops), {"fusion.1", "fusion.2", "dot.3", "copy.1", "add.1"})
    kinds = {name: profile.category(op, rank=3) for name, op in ops.items()}
    # fusion.1 reads a [16, 3] operand, but its dot is [16, 32] · [32, 32]: dense.
    self.assertEqual(kinds, {"fusion.1": "dense products", "fusion.2": "rank products",
                             "dot.3": "rank products", "copy.1": "unfused copies",
                             "add.1": "other ops"})
    flops = {name: sum(d[0] for d in op["dots"]) for name, op in ops.items()}
    self.assertEqual(flops, {"fusion.1": 2 * 16 * 32 * 32, "fusion.2": 2 * 16 * 3 * 32,
                             "dot.3": 2 * 3 * 32 * 16, "copy.1": 0, "add.1": 0})
    self.assertEqual(profile._names("%a, %b, /*index=5*/%c"), ["a", "b", "c"])

  def test_gpu_set_refuses_without_a_gpu(self):
    if jax.default_backend() == "gpu":
      self.assertLen(run_all._gpu_commands("here", "results"), len(run_all.GPU_RUNS))
    else:
      with self.assertRaisesRegex(app.UsageError, "--gpu needs a GPU.*'cpu'"):
        run_all._gpu_commands("here", "results")

  def test_first_step_times_each_phase(self):
    out = os.path.join(self.out_dir, "first_step.json")
    with flagsaver.flagsaver(out=out, depths=["1", "2"], **_TOY):
      first_step.main([])
    with open(out) as f:
      results = json.load(f)
    self.assertEqual(set(results["depths"]), {"1", "2"})
    for depth in results["depths"].values():
      for seconds in depth["seconds"].values():
        self.assertEqual(set(seconds), {*first_step.PHASES, "total"})
        self.assertTrue(all(s > 0 for s in seconds.values()), seconds)
    for depth in results["depths"].values():
      self.assertLen(depth["raw_seconds"]["xrapture"], _TOY["rounds"])

  def test_memory_child_reports_xla_bytes(self):
    with flagsaver.flagsaver(steps=1, **_TOY):
      child = memory.run_child("xrapture")
      full = memory.run_child("full")
    self.assertGreater(child["max_rss"], 0)
    self.assertLess(child["opt_state_bytes"], full["opt_state_bytes"])
    ratios = memory.ratios({"full B=2": full, "xrapture B=2": child}, ["2"])
    self.assertIn("xrapture B=2: XLA step bytes", ratios)

  def test_quant_table(self):
    out = os.path.join(self.out_dir, "quant.json")
    with flagsaver.flagsaver(out=out, d_in=64, d_out=32, rounds=1, warmup=0):
      quant.main([])
    with open(out) as f:
      kinds = json.load(f)["kinds"]
    self.assertEqual(kinds["fp32"]["bits_per_param"], 32)
    self.assertLess(kinds["nf4+dq"]["bytes"], kinds["nf4"]["bytes"])
    self.assertLess(kinds["nf4"]["bytes"], kinds["int8"]["bytes"])

  def test_remat_trains_the_same_model(self):
    out = os.path.join(self.out_dir, "remat.json")
    policies = ["nothing_saveable", "nothing_saveable:1"]   # every block; the first only
    with flagsaver.flagsaver(out=out, policies=policies, **dict(_TOY, n_layers=2)):
      remat.main([])
    with open(out) as f:
      results = json.load(f)
    for policy in policies:
      np.testing.assert_allclose(results["losses"][policy], results["losses"]["lora"],
                                 rtol=1e-5)
      self.assertIn(policy, results["step_ratios"])
    # What each policy keeps is higher_order_test's; what XLA then plans
    # depends on its version (jax 0.10's CPU compiler undoes remat).
    self.assertEqual(set(results["plan_bytes"]), {"full", "lora", *policies})

  def test_remat_of_the_first_blocks_only(self):
    # 'policy:k' puts exactly the first k blocks under remat.
    cfg = lm.Config(d_model=32, n_layers=3, n_heads=2, vocab=32, seq_len=8, batch=2, rank=2,
                    alpha=4.0)
    tokens = lm.batch(cfg)[0]
    params = lm.dense_model(cfg).init(jax.random.PRNGKey(0), tokens)

    def remat_calls(remat_setting):
      model = lm.dense_model(cfg.replace(remat=remat_setting))
      jaxpr = jax.make_jaxpr(model.apply)(params, None, tokens)
      return sum(e.primitive.name in ("checkpoint", "remat", "remat2") for e in jaxpr.eqns)
    self.assertEqual([remat_calls(r) for r in ("", "nothing_saveable", "nothing_saveable:2")],
                     [0, 3, 2])

  def test_mixed_batch_agrees_with_the_loop(self):
    out = os.path.join(self.out_dir, "mixed_batch.json")
    with flagsaver.flagsaver(out=out, adapters=3, **_TOY):
      mixed_batch.main([])
    with open(out) as f:
      results = json.load(f)
    self.assertLess(results["agreement"]["max_abs_diff_mixed_vs_loop"], 1e-4)
    self.assertIn("loop/mixed", results["ratios"])

  def test_qlora_parts_and_ratios(self):
    with flagsaver.flagsaver(**_TOY, block=32, memory_steps=2, timed=["lora", "qlora-nf4"]):
      lora = qlora.memory_child("lora")
      nf4 = qlora.memory_child("qlora-nf4")
      time = qlora.timing_child()
      errors = qlora.error_child()
    self.assertLess(nf4["param_bytes"], lora["param_bytes"] / 3)
    self.assertEqual(nf4["trainable"], lora["trainable"])
    ratios = qlora.ratios({"lora": lora, "qlora-nf4": nf4}, time)
    self.assertIn("qlora-nf4 / lora: XLA step plan", ratios)
    self.assertIn("qlora-nf4 / lora: step time (median of paired ratios)", ratios)
    kinds = errors["kinds"]
    self.assertLess(kinds["int8"]["relative_rms"], kinds["nf4"]["relative_rms"])
    self.assertLess(kinds["nf4+dq"]["bits_per_param"], kinds["nf4"]["bits_per_param"])
    env = dict(date="", machine="", backend="", device="", python="")
    text = qlora.markdown(dict(
        environment=env, config=dict(d_model=32, n_layers=1, vocab=32, seq_len=8, batch=2,
                                     rank=2),
        block=32, memory={"lora": lora, "qlora-nf4": nf4}, time=time, errors=errors,
        ratios=ratios))
    self.assertIn("Quantization error", text)


if __name__ == "__main__":
  absltest.main()
