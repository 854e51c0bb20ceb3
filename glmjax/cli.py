"""`glmjax` command line: info | forward | convert | tokenizer | data | train | generate | launch | plan.

Bad input ends in one `glmjax: error: ...` line and exit status 2. In a job of several processes
(`glmjax launch`, a pod, a cluster) every process runs the same command; process 0 alone writes
outputs and prints results."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from glmjax import config as C
from glmjax.errors import GlmjaxError, InputError
from glmjax.outputs import atomic_file, check_output
from glmjax.parallel.distributed import HEARTBEAT_TIMEOUT_S


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.2f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_mutually_exclusive_group(required=required)
    g.add_argument("--preset", choices=sorted(C.PRESETS), help="a built-in configuration")
    g.add_argument("--config", help="a JSON or YAML model config, or an experiment file (all its sections)")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="overrides: key=value (model) or section.key=value")


def cmd_info(a: argparse.Namespace) -> int:
    if a.config and C.is_experiment(C.load_file(a.config)):  # an experiment: every section, resolved
        from glmjax.experiment import load_experiment

        exp = load_experiment(a.config, a.overrides, default_section="model")
        print("experiment:")
        print("\n".join("  " + line for line in exp.to_yaml().splitlines()))
        cfg = exp.model
    else:
        cfg = C.resolve(a.preset, a.config, a.overrides)
        print("configuration:")
        for k, v in cfg.to_dict().items():
            print(f"  {k}: {v}")
    print(f"  (head_dim: {cfg.head_dim}, deepnorm_alpha: {cfg.deepnorm_alpha:.6f})")
    counts = cfg.param_counts()
    total = sum(counts.values())
    print(f"parameters: {total:,}")
    for k, n in counts.items():
        print(f"  {k}: {n:,}")
    print("parameter bytes:")
    for dt, size in (("float32", 4), ("bfloat16", 2), ("float16", 2)):
        mark = "  <- param_dtype" if dt == cfg.param_dtype else ""
        print(f"  {dt}: {total * size:,} ({_human(total * size)}){mark}")
    return 0


def _load_inputs(path: str) -> dict:
    import numpy as np

    if not os.path.isfile(path):
        raise InputError(f"inputs file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:
        raise InputError(f"cannot read inputs {path}: not a valid .npz ({e})") from None


def _write_npz(path: str, arrays: dict) -> None:
    """An .npz written whole (outputs.atomic_file): a fresh temporary beside `path`, then renamed."""
    import numpy as np

    with atomic_file(path, "wb") as f:
        np.savez(f, **arrays)


def _read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are one error line, not a traceback."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream without bytes underneath (tests)
        return sys.stdin.read()
    data = raw.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"standard input is not UTF-8 ({e.reason} at byte {e.start})") from None


def cmd_forward(a: argparse.Namespace) -> int:
    import jax
    import numpy as np

    from glmjax import checkpoint
    from glmjax.model import api
    from glmjax.parallel import distributed
    from glmjax.parallel.mesh import make_mesh

    check_output(a.output)
    cfg = C.resolve(None, a.config, a.overrides) if a.config else None
    fmt = checkpoint.detect_format(a.checkpoint)
    arrays = _load_inputs(a.inputs)
    batch = {k: v for k, v in arrays.items() if k in api.INPUT_NAMES}
    ignored = sorted(set(arrays) - set(batch))
    mesh = make_mesh(a.mesh)
    t0 = time.perf_counter()
    cfg, params = checkpoint.load_params(fmt, a.checkpoint, cfg, mesh, step=a.step)
    if a.dtype:
        cfg = cfg.replace(dtype=a.dtype)
    if cfg.dtype == "float32":  # no TF32 / bf16 passes in matmuls when comparing implementations
        jax.config.update("jax_default_matmul_precision", "highest")
    api.validate_batch(cfg, batch)
    t1 = time.perf_counter()
    fwd = api.make_forward(cfg, mesh, collect_hidden=a.hidden_states)
    logits, per_layer = fwd(params, batch)
    logits = distributed.to_host(logits).astype(np.float32)
    t2 = time.perf_counter()
    out = {"logits": logits}
    if a.hidden_states:
        hs = distributed.to_host(per_layer["hidden_states"]).astype(np.float32)
        out.update({f"hidden_states_layer{i}": hs[i] for i in range(cfg.num_layers)})
    if not distributed.is_primary():
        return 0
    _write_npz(a.output, out)
    print(f"wrote {a.output}: logits {list(logits.shape)} float32, max|logit| {np.abs(logits).max():.6g} "
          f"(mesh {dict(mesh.shape)}, dtype {cfg.dtype}; load {t1 - t0:.2f} s, forward {t2 - t1:.2f} s)"
          + (f"; ignored input arrays: {', '.join(ignored)}" if ignored else ""))
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    import signal

    from glmjax.checkpoint import parse_location
    from glmjax.convert import run
    from glmjax.parallel import distributed
    from glmjax.parallel.mesh import make_mesh

    def interrupted(signum, frame):  # SIGTERM behaves like Ctrl-C: the partial output is removed
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    _, src_path = parse_location(a.src)
    _, dst_path = parse_location(a.dst)
    if os.path.abspath(src_path) != os.path.abspath(dst_path):  # else run.convert names the mistake
        check_output(dst_path, directory=True, overwrite=a.overwrite)
    cfg = C.resolve(None, a.config, a.overrides) if a.config else None
    if a.verify:
        make_mesh(a.mesh)  # a bad mesh spec fails before any work
    primary = distributed.is_primary()
    if distributed.process_count() == 1:
        res = run.convert(a.src, a.dst, cfg=cfg, tp=a.tp, quantize=a.quantize, dtype=a.dtype,
                          overwrite=a.overwrite, safetensors=a.safetensors, step=a.step)
        gb = res["bytes"] / 1e9
        print(f"wrote {a.dst}: {gb:.3f} GB in {res['seconds']:.1f} s ({gb / max(res['seconds'], 1e-9):.2f} GB/s)")
    else:  # host work, done once: process 0 converts, the others wait; --verify then runs on all
        status = _convert_alone(a.cli_argv) if primary else 0
        distributed.barrier("glmjax convert written")
        if distributed.any_process(status != 0):
            return status or 2
    if not a.verify:
        return 0
    lossy = bool(a.quantize) or a.dtype is not None
    r = run.verify(run.parse_location(a.src), run.parse_location(a.dst), cfg, make_mesh(a.mesh),
                   a.verify_tokens, step=a.step)
    ok = r["kl"] <= a.max_kl if lossy else r["rel_diff"] <= a.tolerance
    if not primary:
        return 0 if ok else 1
    print(f"verify ({a.verify_tokens}-token prompt): max |logit diff| {r['max_abs_diff']:.3g} "
          f"({r['rel_diff']:.2e} of max |logit|), KL {r['kl']:.3g}: "
          + ("OK" if ok else f"ABOVE TOLERANCE ({'KL ' + str(a.max_kl) if lossy else a.tolerance})"))
    return 0 if ok else 1


def _convert_alone(argv: Sequence[str]) -> int:
    """The conversion of a job of several processes, by process 0 in a process of its own on the
    CPU: orbax refuses to save one process's arrays inside a multi-process job, and the devices
    are this process's. The same command without --verify, outside the job."""
    import subprocess

    from glmjax import launch

    env = {k: v for k, v in os.environ.items() if k not in (launch.ENV_COORDINATOR, launch.ENV_NUM_PROCESSES,
                                                           launch.ENV_PROCESS_ID, launch.ENV_CLUSTER)}
    env["JAX_PLATFORMS"] = "cpu"
    cmd = [sys.executable, "-m", "glmjax", *(x for x in argv if x != "--verify")]
    return subprocess.run(cmd, env=env).returncode


def cmd_tokenizer(a: argparse.Namespace) -> int:
    import glob

    from glmjax.data.tokenizer import load_tokenizer, train_tokenizer

    if a.action == "train":
        if not a.input or not a.out:
            raise InputError("tokenizer train needs --input FILES and --out DIR")
        files = sorted({f for pattern in a.input for f in (glob.glob(pattern) or [pattern])})
        tok = train_tokenizer(files, a.vocab_size, a.out, a.layout, overwrite=a.overwrite)
        print(f"wrote {a.out}: {tok.num_text} SentencePiece pieces, layout {tok.layout.name}, model vocabulary "
              f"{tok.vocab_size}, [MASK] {tok['MASK']}, [gMASK] {tok['gMASK']}, sop {tok['sop']}, eos {tok.eos_id}")
        return 0
    if not a.tokenizer:
        raise InputError(f"tokenizer {a.action} needs --tokenizer DIR")
    tok = load_tokenizer(a.tokenizer)
    data = _read_stdin()
    if a.action == "encode":
        print(" ".join(str(i) for i in tok.encode(data[:-1] if data.endswith("\n") else data)))
    else:
        try:
            ids = [int(x) for x in data.split()]
        except ValueError as e:
            raise InputError(f"decode reads whitespace-separated integer ids: {e}") from None
        sys.stdout.write(tok.decode(ids) + "\n")
    return 0


def cmd_data(a: argparse.Namespace) -> int:
    import numpy as np

    from glmjax.data import pipeline

    if a.action == "prepare":
        from glmjax.outputs import atomic_dir

        if a.workers < 1:
            raise InputError(f"--workers must be >= 1, got {a.workers}")
        check_output(a.out, directory=True, overwrite=a.overwrite)
        t0 = time.perf_counter()
        with atomic_dir(a.out, a.overwrite) as tmp:
            stats = pipeline.prepare(a.input, a.tokenizer, tmp, instructions=a.instructions,
                                     text_field=a.text_field, seq_length=a.seq_length, workers=a.workers)
        secs = time.perf_counter() - t0
        print(f"wrote {a.out}: {stats.documents} documents, {stats.tokens} tokens from {stats.files} files in "
              f"{secs:.1f} s ({stats.tokens / max(secs, 1e-9):,.0f} tokens/s, {a.workers} tokenizing "
              f"process{'es' if a.workers > 1 else ''}); skipped lines: {stats.bad_utf8} not "
              f"UTF-8, {stats.bad_json} not a JSON object, {stats.missing_field} missing a field; "
              f"{stats.empty_files} empty files; {stats.long_documents} documents longer than a sequence (split); "
              f"{stats.instructions} instruction samples")
        return 0
    from glmjax.experiment import load_experiment

    if a.num_samples < 1:
        raise InputError(f"--num-samples must be >= 1, got {a.num_samples}")
    check_output(a.output)
    exp = load_experiment(a.config, a.overrides)
    loader = pipeline.GLMLoader(pipeline.TokenShards(exp.data.path), exp.objective, global_batch=1,
                                seed=exp.data.seed, model_vocab=exp.model.vocab_size)
    rows, samples = [], []
    for i in range(a.num_samples):
        seq, smp = loader.sequence(i)
        rows.append(seq)
        samples += smp
    arrays = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    _write_npz(a.output, arrays)
    stats = pipeline.objective_statistics(samples, a.num_samples)
    print(f"wrote {a.output}: " + ", ".join(f"{k} {list(v.shape)}" for k, v in arrays.items()))
    print("objective: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in stats.items()))
    return 0


def cmd_train(a: argparse.Namespace) -> int:
    from glmjax.experiment import load_experiment
    from glmjax.train.loop import main as train_main

    return train_main(load_experiment(a.config, a.overrides))


def cmd_plan(a: argparse.Namespace) -> int:
    import json

    import jax

    from glmjax.plan import programs, targets

    target = targets.parse_target(a.target)
    # libtpu lets one process at a time open it, to own the chips; a plan opens none (compile only)
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # no persistent compilation cache: executables compiled for absent devices cannot be loaded back
    jax.config.update("jax_enable_compilation_cache", False)
    # a plan compiles and never runs: the local backend is the CPU, with the devices cpu:N asks for
    # (once jax has started, what it has is what there is, and the target says if that is too few)
    with contextlib.suppress(RuntimeError):
        jax.config.update("jax_platforms", "cpu")
        if target.chip.platform == "cpu":
            jax.config.update("jax_num_cpu_devices", target.chips)
    if a.json:
        check_output(a.json)
    if len(a.mesh or []) > 1 and not a.search:
        raise GlmjaxError("give --mesh once, or several times with --search")
    if a.generate:
        plan = _plan_generate(a, target)
    else:
        plan = _plan_train(a, target)
        if plan is None:
            return 1
    for line in programs.report(plan):
        print(line)
    if a.json:
        with atomic_file(a.json) as f:
            json.dump(plan.to_json(), f, indent=1)
    return 0 if plan.fits else 1


def _plan_generate(a: argparse.Namespace, target: Any) -> Any:
    from glmjax.plan import programs

    if a.search:
        raise GlmjaxError("--search plans training; --generate plans one batch, prompt and output length")
    if bool(a.preset) == bool(a.config) or a.inputs and "=" not in a.inputs[0]:
        raise GlmjaxError("plan --generate takes --preset NAME or --config FILE (and model key=value overrides)")
    missing = [f"--{k}" for k in ("batch", "prompt", "new") if getattr(a, k) is None]
    if missing:
        raise GlmjaxError(f"plan --generate needs {', '.join(missing)}")
    cfg = C.resolve(a.preset, a.config, a.inputs)
    return programs.plan_generation(cfg, target, a.batch, a.prompt, a.new, a.quantize, (a.mesh or [None])[0])


def _plan_train(a: argparse.Namespace, target: Any) -> Any:
    from glmjax.experiment import load_experiment
    from glmjax.plan import programs

    if not a.inputs or a.preset or a.config or a.quantize or a.batch or a.prompt or a.new:
        raise GlmjaxError("plan takes EXPERIMENT.yaml [section.key=value ...] (or --generate with --preset/--config, "
                          "--batch, --prompt, --new)")
    path, overrides = a.inputs[0], a.inputs[1:]
    load = lambda more: load_experiment(path, [*overrides, *more])  # noqa: E731
    if not a.search:
        return programs.plan_training(load([]), target, (a.mesh or [None])[0])
    print(f"search: remat policies x micro-batch sizes on {target.name}")
    best, tried = programs.search(load, target, a.mesh or [None], print)
    if best is None:
        print(f"no configuration tried fits on {target.name} ({len(tried)} tried)")
        return None
    print(f"fastest predicted that fits: remat {best.setting['remat_policy']}, micro-batch "
          f"{best.setting['micro_batch']}, mesh {','.join(f'{k}={v}' for k, v in best.mesh.items())}")
    return best


def cmd_launch(a: argparse.Namespace) -> int:
    from glmjax import launch

    return launch.main(a.argv, a.processes, a.devices_per_process, a.port, a.heartbeat_timeout)


def job_from_env(env: Mapping[str, str]) -> Any:
    """How this process joins a job of several: set by `glmjax launch` (GLMJAX_COORDINATOR,
    GLMJAX_NUM_PROCESSES, GLMJAX_PROCESS_ID), or GLMJAX_DISTRIBUTED=1 on a pod / cluster (jax finds
    the coordinator in the TPU metadata or the SLURM variables); None: a single process."""
    from glmjax import launch
    from glmjax.parallel.distributed import JobConfig

    def number(name: str, default: int | None = None) -> int | None:
        raw = env.get(name)
        if raw is None:
            return default
        try:
            return int(raw)
        except ValueError:
            raise InputError(f"environment variable {name}={raw!r} is not an integer") from None

    heartbeat = number(launch.ENV_HEARTBEAT, HEARTBEAT_TIMEOUT_S)
    if env.get(launch.ENV_COORDINATOR):
        return JobConfig(env[launch.ENV_COORDINATOR], number(launch.ENV_NUM_PROCESSES),
                         number(launch.ENV_PROCESS_ID), heartbeat)
    if env.get(launch.ENV_CLUSTER) == "1":
        return JobConfig(heartbeat_timeout_s=heartbeat)
    return None


def _generate_config(a: argparse.Namespace) -> Any:
    """The strategy from the flags, checked before any weights load (end tokens: the tokenizer's)."""
    from glmjax.infer.decode import GenerateConfig

    sampling = {k: getattr(a, k) for k in ("temperature", "top_k", "top_p") if getattr(a, k) is not None}
    beam = {k: getattr(a, k) for k in ("num_beams", "length_penalty") if getattr(a, k) is not None}
    strategy = a.strategy or ("beam" if beam else "sample" if sampling else "greedy")
    if strategy != "beam" and beam:
        raise GlmjaxError(f"--{next(iter(beam)).replace('_', '-')} only applies to --strategy beam "
                          f"(got --strategy {strategy})")
    if strategy != "sample" and sampling:
        raise GlmjaxError(f"--{next(iter(sampling)).replace('_', '-')} only applies to --strategy sample "
                          f"(got --strategy {strategy})")
    return GenerateConfig(strategy=strategy, max_new_tokens=a.max_new_tokens, **sampling, **beam,
                          no_repeat_ngram=a.no_repeat_ngram, min_gen_length=a.min_gen_length,
                          deterministic=not a.stochastic_beams, seed=a.seed)


def _read_prompts(a: argparse.Namespace) -> list[str] | None:
    """--prompt, or the prompts of --input-file (JSONL of {"prompt": ...}); None: interactive stdin."""
    if a.prompt is not None and a.input_file:
        raise GlmjaxError("give --prompt or --input-file, not both")
    if a.prompt is not None:
        return [a.prompt]
    if not a.input_file:
        return None
    if not os.path.isfile(a.input_file):
        raise GlmjaxError(f"input file not found: {a.input_file}")
    try:
        with open(a.input_file, "rb") as f:
            raw_lines = f.read().splitlines()
    except OSError as e:
        raise GlmjaxError(f"cannot read {a.input_file}: {e.strerror}") from None
    prompts = [_prompt_of(raw, f"{a.input_file}:{n}") for n, raw in enumerate(raw_lines, 1)]
    prompts = [p for p in prompts if p is not None]
    if not prompts:
        raise GlmjaxError(f"{a.input_file} holds no prompts")
    return prompts


def _prompt_of(raw: bytes, where: str) -> str | None:
    """The prompt of one JSONL line (None: a blank line); anything else is an error naming file:line."""
    import json

    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise GlmjaxError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        obj = None
    if not isinstance(obj, dict) or "prompt" not in obj:
        raise GlmjaxError(f"{where}: expected a JSON object with a \"prompt\"")
    if not isinstance(obj["prompt"], str):
        raise GlmjaxError(f"{where}: \"prompt\" must be a string, got {type(obj['prompt']).__name__}")
    return obj["prompt"]


def _read_prompt_line() -> str | None:
    """The next stdin line (no line end); None at the end. Bytes that are not UTF-8: one error line."""
    raw = getattr(sys.stdin, "buffer", None)
    line = raw.readline() if raw is not None else sys.stdin.readline()
    if not line:
        return None
    if isinstance(line, bytes):
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"this line is not UTF-8 ({e.reason} at byte {e.start})") from None
    return line.rstrip("\r\n")


def cmd_generate(a: argparse.Namespace) -> int:
    import json

    from glmjax.checkpoint import load_model
    from glmjax.infer.blanks import fill_blanks
    from glmjax.infer.decode import Generator
    from glmjax.model.quant import param_bytes
    from glmjax.parallel import distributed
    from glmjax.parallel.mesh import make_mesh

    if a.batch_size < 1:
        raise GlmjaxError(f"--batch-size must be >= 1, got {a.batch_size}")
    prompts = _read_prompts(a)
    if a.output and prompts is None:
        raise GlmjaxError("--output holds the results of --prompt or --input-file (stdin mode prints them)")
    if a.output:
        check_output(a.output)
    if prompts is None and distributed.process_count() > 1:  # stdin is read by one process alone
        raise InputError("interactive generation runs in one process; give --prompt or --input-file")
    gc = _generate_config(a)
    cfg = C.resolve(None, a.config, a.overrides) if a.config else None
    mesh = make_mesh(a.mesh)
    cfg, params, tok = load_model(a.checkpoint, mesh, config=cfg, quantize=a.quantize, tokenizer=a.tokenizer,
                                  step=a.step)
    gen = Generator(cfg, params, mesh, vocab_limit=tok.vocab_size)
    weights = f"int{cfg.quantization_bits}" if cfg.quantization_bits else cfg.param_dtype
    primary = distributed.is_primary()
    if primary:
        print(f"model: {cfg.num_params() / 1e6:.1f}M parameters, {weights} weights: {_human(param_bytes(params))} "
              f"on {mesh.size} device(s); strategy {gc.strategy}", file=sys.stderr)
    if prompts is not None:
        results = []
        for start in range(0, len(prompts), a.batch_size):
            results += fill_blanks(gen, tok, prompts[start:start + a.batch_size], gc)
        lines = []
        for r in results:
            row = {"prompt": r.prompt, "text": r.text, "blanks": r.blanks}
            if r.beams:
                row["beams"] = r.beams
            lines.append(json.dumps(row, ensure_ascii=False) if a.input_file else r.text)
        if not primary:
            return 0
        if not a.output:
            print("\n".join(lines))
            return 0
        with atomic_file(a.output, "w") as f:
            f.write("\n".join(lines) + "\n")
        return 0
    # interactive, as GLM-130B's generate.py: a prompt per line, tokens shown as they come
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("\nEnter prompt (empty line or 'stop' to quit): ", end="", file=sys.stderr, flush=True)
        try:
            line = _read_prompt_line()
            if line is None or line.strip() in ("", "stop"):
                return 0
            stream = (lambda row, text: print(text, end="", flush=True)) if gc.strategy != "beam" else None
            (r,) = fill_blanks(gen, tok, [line], gc, on_token=stream)
        except GlmjaxError as e:  # one bad prompt does not end the session
            print(f"glmjax: error: {e}", file=sys.stderr)
            continue
        print(("\n" if stream else "") + r.text, flush=True)


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are bad input too: one `glmjax: error:` line naming the command, exit 2."""

    def error(self, message: str):
        sys.stderr.write(f"glmjax: error: {self.prog}: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="glmjax", description="GLM-130B in JAX: inspect, run, compare.")
    sub = p.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="print a resolved configuration or experiment, its parameter count and bytes")
    _config_args(info)
    info.set_defaults(func=cmd_info)
    fw = sub.add_parser("forward", help="run a checkpoint on inputs from an .npz, write logits")
    fw.add_argument("--checkpoint", required=True,
                    help="checkpoint directory: a training run, SAT (with 'latest'), glmjax/orbax or HF ChatGLM")
    fw.add_argument("--config", help="model config (JSON/YAML); required for SAT checkpoints")
    fw.add_argument("overrides", nargs="*", metavar="key=value", help="model config overrides")
    fw.add_argument("--inputs", required=True,
                    help="npz: tokens [b,s], position_ids [b,s] or [b,2,s], and attention_mask "
                         "[b,1,s,s] bool (True = blocked) or prefix_mask/segment_ids [b,s]")
    fw.add_argument("--output", required=True, help="npz to write: logits [b,s,vocab] float32")
    fw.add_argument("--mesh", default=None, help="e.g. data=2,fsdp=2,tensor=2 (-1 fills); default one device")
    fw.add_argument("--dtype", choices=C.FLOAT_DTYPES, default=None, help="compute dtype")
    fw.add_argument("--hidden-states", action="store_true", help="also write hidden_states_layer{i}")
    fw.add_argument("--step", type=int, help="training run directory: the checkpoint step (default the newest)")
    fw.set_defaults(func=cmd_forward)
    cv = sub.add_parser("convert", help="convert checkpoints: run (read) | sat | orbax | hf-chatglm")
    cv.add_argument("--from", dest="src", required=True, metavar="FORMAT:PATH")
    cv.add_argument("--to", dest="dst", required=True, metavar="FORMAT:PATH")
    cv.add_argument("--config", help="model config (JSON/YAML); required when reading SAT")
    cv.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    cv.add_argument("--tp", type=int, help="tensor-parallel degree of SAT output (default 1)")
    cv.add_argument("--quantize", choices=("int8", "int4"), help="write GLM-130B's quantized SAT layout")
    cv.add_argument("--dtype", choices=C.FLOAT_DTYPES, help="dtype of the written floating tensors")
    cv.add_argument("--safetensors", action="store_true", help="hf-chatglm output as .safetensors")
    cv.add_argument("--overwrite", action="store_true", help="replace an existing output (when complete)")
    cv.add_argument("--verify", action="store_true",
                    help="run source and output on one long prompt; exit 1 above tolerance")
    cv.add_argument("--verify-tokens", type=int, default=512, help="prompt length for --verify")
    cv.add_argument("--tolerance", type=float, default=1e-5,
                    help="lossless conversions: max |logit diff| / max |logit| (default 1e-5)")
    cv.add_argument("--max-kl", type=float, default=1e-2,
                    help="--quantize/--dtype conversions: largest mean KL divergence accepted")
    cv.add_argument("--mesh", default=None, help="mesh for --verify (default one device)")
    cv.add_argument("--step", type=int, help="--from run:DIR: the checkpoint step (default the newest)")
    cv.set_defaults(func=cmd_convert)
    ge = sub.add_parser("generate", help="fill [MASK]/[sMASK]/[gMASK] blanks: --prompt, --input-file, or stdin")
    ge.add_argument("--checkpoint", required=True, help="training run directory, or a glmjax/SAT/HF checkpoint")
    ge.add_argument("--config", help="model config; required for SAT checkpoints")
    ge.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    ge.add_argument("--tokenizer", help="tokenizer directory or icetk ice_text.model (default: CHECKPOINT/tokenizer)")
    ge.add_argument("--prompt", help="one prompt; without a mask token [gMASK] is appended")
    ge.add_argument("--input-file", help="JSONL of {\"prompt\": ...}; writes JSONL {prompt, text, blanks[, beams]}")
    ge.add_argument("--output", help="file for the results (default stdout)")
    ge.add_argument("--strategy", choices=("greedy", "sample", "beam"))
    ge.add_argument("--max-new-tokens", type=int, default=64)
    ge.add_argument("--temperature", type=float)
    ge.add_argument("--top-k", type=int)
    ge.add_argument("--top-p", type=float)
    ge.add_argument("--num-beams", type=int)
    ge.add_argument("--length-penalty", type=float)
    ge.add_argument("--no-repeat-ngram", type=int, default=0)
    ge.add_argument("--min-gen-length", type=int, default=0)
    ge.add_argument("--stochastic-beams", action="store_true",
                    help="beam candidates sampled as GLM-130B's generate.py (default: top-k, as its evaluation)")
    ge.add_argument("--quantize", choices=("int8", "int4"), help="weight-only quantization kept on the devices")
    ge.add_argument("--mesh", default=None, help="e.g. tensor=2 (-1 fills); default one device")
    ge.add_argument("--batch-size", type=int, default=8, help="prompts per compiled batch (--input-file)")
    ge.add_argument("--seed", type=int, default=0)
    ge.add_argument("--step", type=int, help="training run directory: the checkpoint step (default the newest)")
    ge.set_defaults(func=cmd_generate)
    tr = sub.add_parser("train", help="train (or resume) a GLM from an experiment file")
    tr.add_argument("config", help="experiment YAML (model:, data:, objective:, optim:, loss_scale:, train:)")
    tr.add_argument("overrides", nargs="*", metavar="section.key=value")
    tr.set_defaults(func=cmd_train)
    pl = sub.add_parser("plan", help="compile the training step or generation for a target (TPU, GPU, cpu:N) "
                        "and report memory per device, FLOPs, collectives and a roofline",
                        description="Nothing runs and nothing is allocated: the real programs are compiled "
                        "ahead of time for hardware that need not be attached. Exit 1 when it does not fit.")
    pl.add_argument("inputs", nargs="*", metavar="EXPERIMENT.yaml [section.key=value]",
                    help="training: the experiment and overrides; --generate: model key=value overrides")
    pl.add_argument("--target", required=True,
                    help="v4-512 / v5e-256 / v5p-N / v6e-N (TPU slices), <gpu>x<count> (a100-40gbx768, h100-80gbx8, "
                         "rtx3090x4, rtx2080tix8, a100-80gbxN), or cpu:N")
    pl.add_argument("--mesh", action="append", help="mesh (default: the experiment's; --generate: tensor=-1); "
                    "several with --search")
    pl.add_argument("--json", help="write the plan as one JSON object")
    pl.add_argument("--search", action="store_true", help="try remat policies x micro-batch sizes (x each --mesh) "
                    "and report the fastest predicted one that fits")
    pl.add_argument("--generate", action="store_true", help="plan generation instead of training")
    pl.add_argument("--preset", choices=sorted(C.PRESETS), help="--generate: a built-in model")
    pl.add_argument("--config", help="--generate: a model config or experiment file")
    pl.add_argument("--quantize", choices=("int8", "int4"), help="--generate: weight-only quantized weights")
    pl.add_argument("--batch", type=int, help="--generate: prompts per batch")
    pl.add_argument("--prompt", type=int, help="--generate: prompt tokens")
    pl.add_argument("--new", type=int, help="--generate: tokens to generate")
    pl.set_defaults(func=cmd_plan)
    la = sub.add_parser("launch", help="run a glmjax command as one job of several processes",
                        description="Local: --processes N starts N processes on this machine as one "
                        "distributed job (coordinator on 127.0.0.1). On a pod or cluster, without "
                        "--processes: one process per host joining the job from the cluster's environment.")
    la.add_argument("--processes", type=int, help="processes to start on this machine (default: one, "
                    "joining the pod's or cluster's job)")
    la.add_argument("--devices-per-process", type=int, help="simulated CPU devices per process (CPU only)")
    la.add_argument("--port", type=int, help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument("--heartbeat-timeout", type=int, default=HEARTBEAT_TIMEOUT_S,
                    help=f"seconds after which a silent process counts as dead (default {HEARTBEAT_TIMEOUT_S})")
    la.add_argument("argv", nargs=argparse.REMAINDER, metavar="-- COMMAND", help="the glmjax command and its arguments")
    la.set_defaults(func=cmd_launch)
    tk = sub.add_parser("tokenizer", help="train a GLM tokenizer, or encode/decode with one (stdin -> stdout)")
    tk.add_argument("action", choices=("train", "encode", "decode"))
    tk.add_argument("--tokenizer", help="tokenizer directory (or icetk's ice_text.model) for encode/decode")
    tk.add_argument("--input", nargs="+", default=[], help="train: text files or globs")
    tk.add_argument("--vocab-size", type=int, default=32000, help="train: SentencePiece pieces")
    tk.add_argument("--layout", choices=("glm-130b", "chatglm-6b", "compact"), default="glm-130b",
                    help="id layout: GLM-130B's (text from 20000), ChatGLM-6B's, or compact (text from 0)")
    tk.add_argument("--out", help="train: output directory")
    tk.add_argument("--overwrite", action="store_true",
                    help="train: replace an existing tokenizer (prepared corpora may point to it)")
    tk.set_defaults(func=cmd_tokenizer)
    da = sub.add_parser("data", help="prepare a corpus into token shards, or inspect GLM training sequences")
    dsub = da.add_subparsers(dest="action", required=True)
    dp = dsub.add_parser("prepare", help="tokenize .txt/.jsonl files once into shards on disk")
    dp.add_argument("--tokenizer", required=True, help="tokenizer directory")
    dp.add_argument("--input", nargs="+", required=True, help=".txt / .jsonl files or globs")
    dp.add_argument("--instructions", nargs="*", default=[], help="jsonl of {input, target} objects")
    dp.add_argument("--text-field", default="text", help="jsonl field holding a document")
    dp.add_argument("--seq-length", type=int, default=2048, help="to count documents longer than a sequence")
    dp.add_argument("--out", required=True, help="output directory")
    dp.add_argument("--overwrite", action="store_true", help="replace an existing output")
    dp.add_argument("--workers", type=int, default=1,
                    help="tokenizing processes (the output is byte for byte the same for any number)")
    dp.set_defaults(func=cmd_data)
    di = dsub.add_parser("inspect", help="write N training sequences as the trainer sees them")
    di.add_argument("--config", required=True, help="experiment file (model:, data:, objective:, ...)")
    di.add_argument("overrides", nargs="*", metavar="section.key=value")
    di.add_argument("--num-samples", type=int, default=16)
    di.add_argument("--output", default="inspect.npz", help="npz to write")
    di.set_defaults(func=cmd_data)
    return p


def _quiet_orbax(record) -> bool:
    """glmjax saves without OCDBT on purpose; orbax notes it on every save."""
    return "Skipping merge of OCDBT checkpoints" not in record.getMessage()


_PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "unhealthy", "stopped sending heartbeats")


def _peer_lost(e: BaseException) -> bool:
    """A runtime error of jax that says another process of the job is gone."""
    return type(e).__name__ in ("JaxRuntimeError", "XlaRuntimeError") and any(m in str(e) for m in _PEER_LOST)


def main(argv: Sequence[str] | None = None) -> int:
    import logging

    logging.getLogger("absl").addFilter(_quiet_orbax)
    args = build_parser().parse_args(argv)
    args.cli_argv = list(sys.argv[1:] if argv is None else argv)
    job = None
    try:
        job = job_from_env(os.environ) if args.command != "launch" else None
        if job is not None:
            from glmjax.parallel import distributed

            distributed.initialize(job)
        return args.func(args)
    except GlmjaxError as e:
        print(f"glmjax: error: {e}", file=sys.stderr, flush=True)
        if job is not None:  # the others may not fail alike: no shutdown handshake waiting for them
            sys.stdout.flush()
            os._exit(2)
        return 2
    except KeyboardInterrupt:
        print("glmjax: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if job is None or not _peer_lost(e):
            raise
        # a collective with a dead process failed: one line, and no shutdown handshake with it
        from glmjax.launch import PEER_DIED_LINE

        print(f"{PEER_DIED_LINE} ({str(e).splitlines()[0][:200]})", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)


if __name__ == "__main__":
    sys.exit(main())
