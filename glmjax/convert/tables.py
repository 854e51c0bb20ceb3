"""Per-family tensor tables for the conversion engine: GLM-130B's SAT checkpoints and ChatGLM-6B's
Hugging Face files, each listing tensors in its format's own state-dict order.

Transforms are written shape-agnostically (-1 where a tensor-parallel cut changes the size) so the
same rule converts a whole tensor or one rank's shard. Which of these tensors are quantizable is not
stated here: TensorRule.quantizable reads it from glmjax.model.quant.KERNELS.
"""
from __future__ import annotations

from glmjax.config import GLMConfig
from glmjax.convert.engine import TensorRule

ident = lambda w: w  # noqa: E731


def _glm_layer_rules(cfg: GLMConfig, mlp_order: tuple[str, str]) -> dict[str, list[TensorRule]]:
    h, f, d = cfg.hidden_size, cfg.inner_hidden_size, cfg.head_dim
    lay, att, mlp = "transformer.layers.{i}.", ("layers", "attention"), ("layers", "mlp")

    def norm(name: str) -> list[TensorRule]:
        return [TensorRule(lay + f"{name}.weight", ("layers", name, "scale"), (h,), "replicated", None, ident, ident),
                TensorRule(lay + f"{name}.bias", ("layers", name, "bias"), (h,), "replicated", None, ident, ident)]

    rules = {
        "input_layernorm": norm("input_layernorm"),
        "attention": [
            # rows are [head][q|k|v][head_dim]: glmjax keeps that grouping, input dim first
            TensorRule(lay + "attention.query_key_value.weight", att + ("qkv_kernel",), (3 * h, h), "rows", 1,
                       lambda w: w.reshape(-1, 3, d, h).transpose(3, 0, 1, 2),
                       lambda k: k.transpose(1, 2, 3, 0).reshape(-1, h)),
            TensorRule(lay + "attention.query_key_value.bias", att + ("qkv_bias",), (3 * h,), "rows", 0,
                       lambda b: b.reshape(-1, 3, d), lambda b: b.reshape(-1)),
            TensorRule(lay + "attention.dense.weight", att + ("dense_kernel",), (h, h), "cols", 0,
                       lambda w: w.T.reshape(-1, d, h), lambda k: k.reshape(-1, h).T),
            TensorRule(lay + "attention.dense.bias", att + ("dense_bias",), (h,), "replicated", None, ident, ident)],
        "post_attention_layernorm": norm("post_attention_layernorm"),
        "dense_4h_to_h": [
            TensorRule(lay + "mlp.dense_4h_to_h.weight", mlp + ("wo_kernel",), (h, f), "cols", 0,
                       lambda w: w.T, lambda k: k.T),
            TensorRule(lay + "mlp.dense_4h_to_h.bias", mlp + ("wo_bias",), (h,), "replicated", None, ident, ident)],
    }
    if cfg.glu:  # rows are [value rows; gate rows], of the whole tensor and of each rank's shard
        rules["dense_h_to_4h"] = [
            TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (2 * f, h), "glu", 2,
                       lambda w: w.reshape(2, -1, h).transpose(2, 0, 1),
                       lambda k: k.transpose(1, 2, 0).reshape(-1, h)),
            TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (2 * f,), "glu", 1,
                       lambda b: b.reshape(2, -1), lambda b: b.reshape(-1))]
    else:
        rules["dense_h_to_4h"] = [
            TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (f, h), "rows", 1,
                       lambda w: w.T, lambda k: k.T),
            TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (f,), "rows", 0, ident, ident)]
    order = ["input_layernorm", "attention", "post_attention_layernorm", *mlp_order]
    return {k: rules[k] for k in order}


def _glm_table(cfg: GLMConfig, mlp_order: tuple[str, str]) -> list[TensorRule]:
    h, v = cfg.hidden_size, cfg.vocab_size
    rules = [TensorRule("transformer.word_embeddings.weight", ("word_embeddings",), (v, h), "rows", 0, ident, ident)]
    rules += [r for group in _glm_layer_rules(cfg, mlp_order).values() for r in group]
    rules += [TensorRule("transformer.final_layernorm.weight", ("final_layernorm", "scale"), (h,), "replicated",
                         None, ident, ident),
              TensorRule("transformer.final_layernorm.bias", ("final_layernorm", "bias"), (h,), "replicated",
                         None, ident, ident)]
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), (v, h), "rows", 0, ident, ident))
    return rules


def sat_rules(cfg: GLMConfig) -> list[TensorRule]:
    """GLM-130B's SAT state dict, in GLM130B.state_dict() order (SAT's GLU mixin re-creates
    dense_h_to_4h, so it comes after dense_4h_to_h)."""
    return _glm_table(cfg, ("dense_4h_to_h", "dense_h_to_4h"))


def hf_chatglm_rules(cfg: GLMConfig) -> list[TensorRule]:
    """ChatGLM-6B's Hugging Face state dict, in modeling_chatglm.py order."""
    return _glm_table(cfg, ("dense_h_to_4h", "dense_4h_to_h"))
