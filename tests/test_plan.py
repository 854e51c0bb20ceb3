"""`glmjax plan`: the real step and generation programs compiled for a target from shapes alone."""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from glmjax import cli
from glmjax import config as C
from glmjax.experiment import load_experiment
from glmjax.plan import hlo, roofline, targets
from glmjax.plan.programs import device_bytes, memory, plan_generation, plan_training, search

HAS_TPU_COMPILER = importlib.util.find_spec("libtpu") is not None
# the Makefile installs the CUDA plugin beside the venv (plan-gpu/), not in it: a CUDA plugin in the
# environment makes every jax start print CUDA driver notices on stderr; the GPU plans run there
PLAN_GPU_PATH = os.path.join(sys.prefix, "plan-gpu")
HAS_GPU_COMPILER = os.path.isdir(os.path.join(PLAN_GPU_PATH, "jax_plugins"))
needs_tpu = pytest.mark.skipif(not HAS_TPU_COMPILER, reason="libtpu not installed: pip install 'glmjax[plan-tpu]'")
needs_gpu = pytest.mark.skipif(not HAS_GPU_COMPILER, reason=f"no CUDA plugin in {PLAN_GPU_PATH}: make install-plan-gpu")


@pytest.fixture(autouse=True)
def _no_persistent_cache():
    """Nothing written to the session's compilation cache (tests/conftest.py): executables compiled
    for absent devices cannot be read back. (`glmjax plan` turns the cache off before jax uses it;
    in this process jax has decided already, so writes are stopped by their time threshold.)"""
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
    yield
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before)


def _experiment(tmp_path, mesh="data=2,fsdp=2,tensor=2", micro=16, extra="", global_batch=32):
    model = "".join(f"  {line}\n" for line in extra.splitlines())
    path = tmp_path / "exp.yaml"
    path.write_text(f"model:\n  preset: glm-test\n  remat_policy: full\n{model}"
                    f"data:\n  path: /never/read\nobjective:\n  window: 32\n"
                    f"optim:\n  global_batch: {global_batch}\n  rampup_batch_size: null\n"
                    f"train:\n  micro_batch: {micro}\n  mesh: {mesh}\n")
    return str(path)


def _live_bytes_on(device, tree) -> int:
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def test_a_cpu8_plan_is_the_compiled_step_and_its_state_bytes_are_the_real_shards(tmp_path):
    """Stated tolerance: none. The plan's programs are the trainer's own (glmjax/train/step.py), so
    XLA's memory of each equals that of the step compiled on the real devices byte for byte, and the
    parameter / optimizer bytes equal what one device holds of a real initialised state."""
    from glmjax.model.api import init_params
    from glmjax.parallel.mesh import make_mesh
    from glmjax.train import step as S

    exp = load_experiment(_experiment(tmp_path))
    plan = plan_training(exp, targets.parse_target("cpu:8"))
    mesh = make_mesh(exp.train.mesh, jax.devices()[:8])
    real = S.TrainStep(exp.model, exp.optim, exp.loss_scale, mesh, exp.train.micro_batch, exp.objective.seq_length)
    assert plan.programs == {name: memory(c) for name, c in real.programs.items()}
    state = S.init_state(exp.model, init_params(exp.model, jax.random.key(0), mesh), exp.optim, exp.loss_scale, 0, mesh)
    d0 = mesh.devices.flat[0]
    assert plan.per_device["params"] == _live_bytes_on(d0, state.params)
    assert plan.per_device["optimizer"] == _live_bytes_on(d0, state.opt_state)
    # the total: what stays on the device between the programs (the state, and the float32 gradient
    # accumulator shaped like the parameters) plus the largest program's own needs
    micro = {k: np.zeros(v.shape, v.dtype) for k, v in real.batch_specs.items()}
    batch = _live_bytes_on(d0, jax.device_put(micro, real.batch_shardings))
    own = {name: m["output"] - m["alias"] + m["temp"] + (batch if name == "accumulate" else 0)
           for name, m in plan.programs.items()}
    resident = _live_bytes_on(d0, state) + _live_bytes_on(d0, state.params)
    assert plan.per_device["total"] - resident - max(own.values()) in range(0, 64)  # scalars of the accumulator
    assert plan.fits and plan.bounds is None  # a CPU has no published peak: no roofline offered


def test_parameter_and_optimizer_bytes_are_the_analytic_counts_on_one_device(tmp_path):
    exp = load_experiment(_experiment(tmp_path, mesh="data=1", micro=32))
    plan = plan_training(exp, targets.parse_target("cpu:1"))
    n = exp.model.num_params()
    assert plan.per_device["params"] == 4 * n  # float32 master weights
    # Adam's two float32 moments, plus its step count and the injected learning rate (scalars)
    assert 8 * n <= plan.per_device["optimizer"] <= 8 * n + 64


def test_a_configuration_that_cannot_fit_says_so_in_one_line_and_exits_1(tmp_path, capsys):
    # 12.9 B parameters: 206 GB of weights, moments and accumulator over 8 devices of this host
    path = _experiment(tmp_path, mesh="fsdp=8", micro=8,
                       extra="num_layers: 16\nhidden_size: 8192\nnum_attention_heads: 64\ninner_hidden_size: 16384")
    out_json = tmp_path / "plan.json"
    assert cli.main(["plan", path, "--target", "cpu:8", "--json", str(out_json)]) == 1
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("does not fit: needs ") and " GiB per device" in out[-1]
    assert sum(line.startswith("does not fit") for line in out) == 1
    plan = json.loads(out_json.read_text())
    assert plan["fits"] is False and plan["per_device_bytes"]["total"] > plan["device_memory_bytes"]


def test_the_json_has_the_issues_keys_and_the_text_ends_with_the_verdict(tmp_path, capsys):
    out_json = tmp_path / "plan.json"
    assert cli.main(["plan", _experiment(tmp_path), "train.micro_batch=8", "--target", "cpu:8",
                     "--json", str(out_json)]) == 0
    text = capsys.readouterr().out.strip().splitlines()
    plan = json.loads(out_json.read_text())
    for key in ("target", "devices", "fits", "device_memory_bytes", "per_device_bytes", "flops_per_step",
                "predicted_step_seconds", "predicted_mfu", "collectives"):
        assert key in plan, key
    assert set(plan["per_device_bytes"]) == {"params", "optimizer", "temp", "output", "total"}
    b = plan["per_device_bytes"]
    assert b["total"] == b["params"] + b["optimizer"] + b["temp"] + b["output"]
    assert plan["setting"]["micro_batch"] == 8 and plan["setting"]["micro_batches"] == 4  # the override applied
    assert plan["devices"] == 8 and plan["fits"] and text[-1].startswith("fits: ")
    kinds = {c["kind"] for c in plan["collectives"]}
    assert {"all-gather", "all-reduce"} <= kinds  # FSDP gathers weights, tensor parallelism reduces activations
    assert plan["flops_per_step"] == pytest.approx(
        roofline.model_flops_per_token(C.resolve("glm-test"), 128) * 32 * 128)


def test_flops_are_counted_from_the_shapes_and_full_remat_is_glm130bs_hfu_over_mfu():
    """GLM-130B reports 43.3% HFU and 32.5% MFU: with full recomputation the chips run 4/3 of the
    model's FLOPs (paper section 3 / spec)."""
    cfg = C.resolve("glm-130b")
    ratio = roofline.hardware_flops_per_token(cfg, 2048, "full") / roofline.model_flops_per_token(cfg, 2048)
    assert ratio == pytest.approx(43.3 / 32.5, rel=0.01)
    assert roofline.hardware_flops_per_token(cfg, 2048, "dots") == roofline.model_flops_per_token(cfg, 2048)


def test_collectives_in_loops_count_once_per_trip():
    text = textwrap.dedent("""\
        HloModule m

        %body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
          %p = (s32[], f32[8]) parameter(0)
          %x = f32[8]{0} get-tuple-element(%p), index=1
          %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups=[2,2]<=[4], to_apply=%add
          %ag-start = (f32[2]{0}, f32[8]{0}) all-gather-start(%x), replica_groups={{0,1,2,3}}, dimensions={0}
          %ag-done = f32[8]{0} all-gather-done(%ag-start)
          ROOT %t = (s32[], f32[8]) tuple(%i, %ar)
        }

        %cond (p: (s32[], f32[8])) -> pred[] {
          %p = (s32[], f32[8]) parameter(0)
          %n = s32[] constant(70)
          %i = s32[] get-tuple-element(%p), index=0
          ROOT %lt = pred[] compare(%i, %n), direction=LT
        }

        ENTRY %main (a: f32[8]) -> f32[8] {
          %a = f32[8]{0} parameter(0)
          %w = (s32[], f32[8]) while(%t0), condition=%cond, body=%body
          %rs = f32[2]{0} reduce-scatter(%a), replica_groups=[1,4]<=[4], dimensions={0}, to_apply=%add
          ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
        }
        """)
    ops = {(c.kind, c.group_size, c.across_hosts): c for c in hlo.collectives(text, hosts=[0, 0, 1, 1])}
    assert ops[("all-reduce", 2, False)].count == 70 and ops[("all-reduce", 2, False)].bytes == 32
    assert ops[("all-gather", 4, True)].count == 70 and ops[("all-gather", 4, True)].bytes == 32  # the result
    assert ops[("reduce-scatter", 4, True)].count == 1
    assert ops[("reduce-scatter", 4, True)].wire_bytes == 3 * 8  # (n - 1) x its result


def test_target_names_follow_maxtext_and_gpu_counts():
    assert targets.parse_target("v4-512").chips == 256  # v4 counts TensorCores, two per chip
    assert targets.parse_target("v5e-256").chips == 256
    a100 = targets.parse_target("a100-40gbx768")
    assert (a100.chips, a100.hosts, a100.chip.memory_bytes) == (768, 96, 40 * targets.GiB)
    assert targets.parse_target("rtx2080tix8").chip.memory_bytes == 11 * targets.GiB
    for bad in ("v4-7", "a100x8", "rtx3090x12", "cpu:0", "tpu"):
        with pytest.raises(Exception, match="target"):
            targets.parse_target(bad)


def test_a_generation_plan_on_cpu_counts_the_kv_cache_and_the_quantized_weights():
    cfg = C.resolve("glm-test")
    plan = plan_generation(cfg, targets.parse_target("cpu:8"), batch=3, prompt=20, new=12, quantize="int4")
    b, slots = 4, 32 + 12  # the batch padded to a power of two, the prompt to its bucket
    assert plan.generation["kv_cache_bytes"] == 2 * cfg.num_layers * b * slots * cfg.hidden_size * 4
    assert plan.generation["kv_cache_bytes_per_device"] == plan.generation["kv_cache_bytes"] // 8  # tensor=8
    assert plan.setting["weights"] == "int4" and plan.fits
    float_plan = plan_generation(cfg, targets.parse_target("cpu:8"), batch=3, prompt=20, new=12)
    kernels = cfg.num_layers * (4 * cfg.hidden_size ** 2 + 3 * cfg.hidden_size * cfg.inner_hidden_size)
    saved = float_plan.per_device["params"] - plan.per_device["params"]
    # float32 kernels -> packed nibbles (+ float16 scales, a few per output unit), tensor-parallel over 8
    assert kernels * (4 - 0.5) / 8 * 0.95 < saved < kernels * (4 - 0.5) / 8


@needs_tpu
def test_a_tpu_plan_compiles_the_step_for_a_v4_slice_and_prices_it(tmp_path):
    exp = load_experiment(_experiment(tmp_path))
    plan = plan_training(exp, targets.parse_target("v4-16"))
    assert plan.fits and plan.target.chip.device_kind == "TPU v4" and plan.target.hosts == 2
    assert plan.bounds["step"] >= max(plan.bounds["compute"], plan.bounds["hbm"], plan.bounds["collectives"])
    assert 0 < plan.predicted_mfu < 1
    # the layer scan's collectives count once per layer: at least one all-gather per layer and pass
    gathers = sum(c.count for c in plan.collectives["accumulate"] if c.kind == "all-gather")
    assert gathers >= exp.model.num_layers * 2


@needs_tpu
def test_the_tpu_compiler_refusing_memory_is_the_does_not_fit_line(tmp_path, capsys):
    path = _experiment(tmp_path, mesh="fsdp=4", micro=32, extra="hidden_size: 8192\nnum_attention_heads: 64\n"
                       "inner_hidden_size: 32768\nnum_layers: 8")
    assert cli.main(["plan", path, "--target", "v4-8"]) == 1
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("does not fit: needs at least ") and "of 32.0 GiB per device" in last
    assert "ran out of device memory: RESOURCE_EXHAUSTED" in last  # the TPU compiler's own refusal, quoted


@needs_tpu
def test_search_returns_the_fastest_predicted_plan_that_fits_over_policies_sizes_and_meshes(tmp_path):
    path = _experiment(tmp_path, mesh="fsdp=4", micro=4, global_batch=4, extra="num_layers: 1\nmax_sequence_length: 32")
    best, tried = search(lambda more: load_experiment(path, more), targets.parse_target("v4-8"),
                         [None, "fsdp=2,tensor=2"], lambda line: None)
    fitting = [p for p in tried if p.fits]
    assert best is not None and best.bounds["step"] == min(p.bounds["step"] for p in fitting)
    assert {p.setting["remat_policy"] for p in tried} == set(C.REMAT_POLICIES)
    # micro-batches are multiples of data x fsdp that divide the batch: 4 on fsdp=4; 2 and 4 on fsdp=2
    tried_shapes = {(p.mesh["fsdp"], p.mesh["tensor"], p.setting["micro_batch"]) for p in tried}
    assert tried_shapes == {(4, 1, 4), (2, 2, 2), (2, 2, 4)}


@needs_gpu
def test_a_gpu_plan_of_int4_generation_on_rtx3090s(tmp_path):
    out_json = tmp_path / "plan.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([PLAN_GPU_PATH, os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-m", "glmjax", "plan", "--generate", "--preset", "glm-test", "--quantize",
                        "int4", "--batch", "2", "--prompt", "30", "--new", "8", "--target", "rtx3090x4",
                        "--json", str(out_json)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    plan = json.loads(out_json.read_text())
    assert plan["device_kind"] == "NVIDIA GeForce RTX 3090" and plan["devices"] == 4 and plan["fits"]
    assert plan["mesh"]["tensor"] == 4 and plan["generation"]["per_token_hbm_floor_seconds"] > 0
    assert r.stdout.strip().splitlines()[-1].startswith("fits: ")


def test_device_bytes_of_an_uneven_layout_is_the_largest_shard():
    from jax.sharding import NamedSharding, PartitionSpec

    from glmjax.parallel.mesh import make_mesh

    mesh = make_mesh("tensor=8", jax.devices()[:8])
    x = jax.ShapeDtypeStruct((16, 3), np.float32)
    assert device_bytes([x], [NamedSharding(mesh, PartitionSpec("tensor"))]) == 2 * 3 * 4


def test_the_plan_extras_pin_the_compilers_the_runtime_extras_and_the_makefile_use():
    import configparser
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    extras = configparser.ConfigParser()
    extras.read(root / "setup.cfg")
    pins = {name: set(extras["options.extras_require"][name].split()) for name in ("tpu", "plan-tpu", "plan-gpu")}
    assert pins["plan-tpu"] <= pins["tpu"]  # the libtpu the pods run
    makefile = (root / "Makefile").read_text()
    assert set(re.search(r"^PLAN_GPU_PINS := (.*)$", makefile, re.M).group(1).split()) == pins["plan-gpu"]
    jax_pin = next(p for p in pins["tpu"] if p.startswith("jax[tpu]=="))
    assert all(p.endswith(jax_pin.split("==")[1]) for p in pins["plan-gpu"])  # the plugin of jax's version


def test_a_program_the_compiler_refuses_is_one_line_naming_it_and_why(tmp_path, capsys, monkeypatch):
    from glmjax.train import step as S

    def refuse(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("INTERNAL: Couldn't find output tile sizes that satisfy hlo: %dot.96\nmore")

    monkeypatch.setattr(S, "TrainStep", refuse)
    assert cli.main(["plan", _experiment(tmp_path), "--target", "cpu:8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["glmjax: error: the training step does not compile for cpu:8: INTERNAL: Couldn't find output "
                   "tile sizes that satisfy hlo: %dot.96"]


@pytest.mark.parametrize("argv, message", [
    (["--search"], "has no published peak"),
    (["--mesh", "fsdp=8", "--mesh", "tensor=8"], "give --mesh once"),
    (["--batch", "2"], "plan takes EXPERIMENT.yaml"),
])
def test_plan_usage_mistakes_are_one_error_line(tmp_path, capsys, argv, message):
    assert cli.main(["plan", _experiment(tmp_path), "--target", "cpu:8", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("glmjax: error: ") and message in err[0], err
