"""`make demo`: the whole chain on a CPU-simulated 8-device mesh, in a few minutes on 2 cores.

1. corpus: the English text of Python's own documentation (pydoc_data, ships with Python), split
   into train and held-out topics; a 2000-piece tokenizer trained on it by glmjax, in the `compact`
   id layout (GLM-130B's special tokens without icetk's 20000 image ids);
2. `glmjax train`: a ~3.7M-parameter GLM with the GLM objective on mesh data=2,fsdp=2,tensor=2,
   interrupted by SIGTERM half way (it checkpoints and exits), then started again (it resumes);
3. held-out loss of the final checkpoint (and of the untrained model, for scale);
4. `glmjax generate`: a [MASK] prompt and a [gMASK] prompt filled with what the model learned.
Everything lands under runs/demo/. Environment: DEMO_STEPS (default 300) changes the length.
"""
import json
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before jax is imported
os.environ.setdefault("JAX_PLATFORMS", "cpu")
import signal  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "runs", "demo")
STEPS = int(os.environ.get("DEMO_STEPS", "300"))
CPU_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
GLMJAX = [sys.executable, "-m", "glmjax"]

EXPERIMENT = """# written by tools/demo.py
model:
  num_layers: 4
  hidden_size: 256
  num_attention_heads: 8
  inner_hidden_size: 688
  vocab_size: {vocab}
  max_sequence_length: 64
  hidden_dropout: 0.0
  attention_dropout: 0.0
data:
  path: {data}
  seed: 1
objective:
  window: 32
optim:
  lr: 0.003
  min_lr: 0.0003
  warmup_samples: 160
  decay_samples: {decay}
  rampup_batch_size: [8, 8, 160]
  global_batch: 16
train:
  steps: {steps}
  micro_batch: 8
  mesh: data=2,fsdp=2,tensor=2
  checkpoint_dir: {ckpt}
  checkpoint_every: 50
  keep: 2
  log_every: 25
"""


def sh(*args: str, **kw) -> None:
    r = subprocess.run(list(args), env=CPU_ENV, **kw)
    if r.returncode:
        sys.exit(f"demo: {' '.join(args[2:5])} failed (exit {r.returncode})")


def corpus() -> tuple[str, str]:
    from pydoc_data.topics import topics

    os.makedirs(OUT, exist_ok=True)
    names = sorted(topics)
    held = {n for i, n in enumerate(names) if i % 10 == 0}  # every tenth topic is held out
    paths = {}
    def prose(text: str) -> str:  # paragraphs on one line each: no indentation runs to learn
        paras = [" ".join(p.split()) for p in text.split("\n\n")]
        return "\n".join(p for p in paras if len(p) > 40)

    for split, keep in (("train", lambda n: n not in held), ("heldout", lambda n: n in held)):
        paths[split] = os.path.join(OUT, f"pydoc_{split}.txt")
        with open(paths[split], "w", encoding="utf-8") as f:
            f.write("\n\n".join(prose(topics[n]) for n in names if keep(n)))
    return paths["train"], paths["heldout"]


def prepare_data() -> None:
    train_txt, held_txt = corpus()
    tok = os.path.join(OUT, "tokenizer")
    if not os.path.isfile(os.path.join(tok, "glmjax_tokenizer.json")):
        sh(*GLMJAX, "tokenizer", "train", "--input", train_txt, "--vocab-size", "2000", "--layout", "compact",
           "--out", tok, stdout=subprocess.DEVNULL)
    for split, txt in (("train", train_txt), ("heldout", held_txt)):
        if not os.path.isfile(os.path.join(OUT, "data", split, "manifest.json")):
            sh(*GLMJAX, "data", "prepare", "--tokenizer", tok, "--input", txt, "--seq-length", "64",
               "--out", os.path.join(OUT, "data", split), "--overwrite", stdout=subprocess.DEVNULL)


def train(exp: str, ckpt: str) -> None:
    """Run to STEPS with one SIGTERM half way (checkpoint + exit), then resume."""
    metrics = os.path.join(ckpt, "metrics.jsonl")

    def last_step() -> int:
        if not os.path.isfile(metrics):
            return 0
        with open(metrics) as f:
            steps = [json.loads(x).get("step", 0) for x in f if x.strip()]
        return max(steps, default=0)

    if last_step() < STEPS // 2:
        print(f"\n== training {STEPS} steps; SIGTERM after step {STEPS // 2} (preemption) ==", flush=True)
        proc = subprocess.Popen([*GLMJAX, "train", exp], env=CPU_ENV)
        while proc.poll() is None and last_step() < STEPS // 2:
            time.sleep(0.5)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        if proc.wait() != 0:
            sys.exit(f"demo: training exited with {proc.returncode}")
    print("\n== started again: resumes from the newest checkpoint ==", flush=True)
    sh(*GLMJAX, "train", exp)


def main() -> int:
    t0 = time.time()
    prepare_data()
    from glmjax.data.tokenizer import load_tokenizer

    vocab = load_tokenizer(os.path.join(OUT, "tokenizer")).vocab_size
    ckpt = os.path.join(OUT, "run")
    exp = os.path.join(OUT, "experiment.yaml")
    with open(exp, "w") as f:
        f.write(EXPERIMENT.format(vocab=vocab, data=os.path.join(OUT, "data", "train"), steps=STEPS,
                                  decay=STEPS * 16, ckpt=ckpt))
    train(exp, ckpt)

    import jax

    from glmjax.checkpoint import RunDir, load_params
    from glmjax.data.objective import ObjectiveConfig
    from glmjax.infer.evaluate import heldout_loss
    from glmjax.model.api import init_params
    from glmjax.parallel.mesh import make_mesh

    mesh = make_mesh("data=2,fsdp=2,tensor=2")
    step = RunDir(ckpt).step()
    cfg, params = load_params("run", ckpt, None, mesh, step=step)
    obj = ObjectiveConfig(seq_length=cfg.max_sequence_length, window=32)
    held = os.path.join(OUT, "data", "heldout")
    trained = heldout_loss(cfg, params, mesh, held, obj)
    untrained = heldout_loss(cfg, init_params(cfg, jax.random.key(0), mesh), mesh, held, obj)
    print(f"\n== held-out loss (pydoc topics never trained on, {trained['tokens']} target tokens) ==")
    print(f"step {step}: loss {trained['loss']:.3f} (perplexity {trained['perplexity']:.1f}, accuracy "
          f"{trained['accuracy']:.1%}); untrained model: loss {untrained['loss']:.3f}")
    import numpy as np

    from glmjax.model import api, quant

    host = jax.tree.map(np.asarray, jax.device_get(params))
    for bits in (8, 4):  # GLM-130B's weight-only quantization of the same weights
        qcfg = cfg.replace(quantization_bits=bits)
        q = heldout_loss(qcfg, api.shard_params(quant.quantize_params(host, bits), qcfg, mesh), mesh, held, obj)
        print(f"  int{bits} weights: perplexity {q['perplexity']:.2f} "
              f"({q['perplexity'] / trained['perplexity'] - 1:+.2%} vs float32)")
    del params

    prompts = os.path.join(OUT, "prompts.jsonl")
    with open(prompts, "w") as f:
        for p in ("The [MASK] statement is used to define a function.",
                  "A list is a mutable sequence of", ):
            f.write(json.dumps({"prompt": p}) + "\n")
    print("\n== glmjax generate (greedy, KV cache, mesh tensor=2) ==", flush=True)
    answers = os.path.join(OUT, "answers.jsonl")
    # a model trained for minutes on a CPU knows word frequencies more than phrases: ask for at
    # least three tokens per blank and no repeated bigram (GLM-130B's --min-gen-length and
    # --no-repeat-ngram), so the blanks show what it learned rather than an immediate [eop]
    sh(*GLMJAX, "generate", "--checkpoint", ckpt, "--input-file", prompts, "--output", answers,
       "--max-new-tokens", "12", "--min-gen-length", "3", "--no-repeat-ngram", "2", "--mesh", "tensor=2,data=-1")
    with open(answers) as f:
        for line in f:
            r = json.loads(line)
            print(f"prompt: {r['prompt']}\n  -> {r['text']}")
    print(f"\ndemo finished in {time.time() - t0:.0f} s. Outputs under {OUT}/: tokenizer/, data/, experiment.yaml, "
          f"run/ (orbax checkpoints, metrics.jsonl, tensorboard/), answers.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
