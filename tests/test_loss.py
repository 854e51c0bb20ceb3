"""The chunked, vocab-parallel cross-entropy of training (glmjax/train/loss.py)."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from glmjax.parallel import rules
from glmjax.parallel.mesh import make_mesh
from glmjax.train.loss import chunk_size, token_sums


def _plain(hidden, head, targets, mask):
    """The whole-logits formulation the step used before: log-softmax of float32 logits."""
    logits = jnp.einsum("bse,ve->bsv", hidden, head.astype(hidden.dtype), preferred_element_type=jnp.float32)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    m = mask.astype(jnp.float32)
    return (nll * m).sum(), ((logits.argmax(-1) == targets) * m).sum()


def _case(b=4, s=64, h=32, v=256, seed=0):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(b, s, h)), jnp.float32), jnp.asarray(rng.normal(size=(v, h)) * 0.3,
            jnp.float32), jnp.asarray(rng.integers(0, v, (b, s)), jnp.int32),
            jnp.asarray(rng.random((b, s)) < 0.7, jnp.int32))


def test_chunked_vocab_parallel_loss_and_gradients_equal_the_whole_logits_loss():
    hidden, head, targets, mask = _case()
    mesh = make_mesh("data=2,tensor=4", jax.devices()[:8])
    put = lambda x, *axes: jax.device_put(x, rules.named(mesh, *axes))  # noqa: E731
    hidden, head = put(hidden, "batch", None, None), put(head, "vocab", None)  # the head split by vocabulary
    targets, mask = put(targets, "batch", None), put(mask, "batch", None)

    def chunked(hd, w):
        with nn.logical_axis_rules(rules.LOGICAL_AXIS_RULES):
            return token_sums(hd, w, targets, mask, chunk=16).nll  # 4 chunks of the 64 positions

    with jax.set_mesh(mesh):
        sums = jax.jit(lambda hd, w: token_sums(hd, w, targets, mask, chunk=16))(hidden, head)
        want_nll, want_right = jax.jit(lambda hd, w: _plain(hd, w, targets, mask))(hidden, head)
        got = jax.jit(jax.grad(chunked, argnums=(0, 1)))(hidden, head)
        want = jax.jit(jax.grad(lambda hd, w: _plain(hd, w, targets, mask)[0], argnums=(0, 1)))(hidden, head)
    np.testing.assert_allclose(float(sums.nll), float(want_nll), rtol=1e-6)
    assert float(sums.correct) == float(want_right) and float(sums.tokens) == float(mask.sum())
    for g, w in zip(got, want):
        scale = float(jnp.abs(w).max())
        assert float(jnp.abs(g - w).max()) <= 1e-6 * scale


def test_the_gradient_program_never_holds_the_whole_float32_logits():
    b, s, v = 2, 256, 1024
    hidden, head, targets, mask = _case(b=b, s=s, h=32, v=v)
    grad = jax.jit(jax.grad(lambda hd, w: token_sums(hd, w, targets, mask, chunk=32).nll, argnums=(0, 1)))
    text = grad.lower(hidden, head).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) for dims in re.findall(r"f32\[([\d,]*)\]", text)]
    assert max(sizes) < b * s * v // 4  # one chunk's logits (b x 32 x v) is the largest float32 block
    assert max(sizes) >= b * 32 * v


def test_the_chunk_divides_the_sequence():
    assert chunk_size(2048) == 512 and chunk_size(128) == 128 and chunk_size(600, 512) == 300

