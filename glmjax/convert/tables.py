"""Per-family tensor tables for the conversion engine: GLM-130B's SAT checkpoints and ChatGLM-6B's
Hugging Face files. Tables list tensors in each format's own state-dict order."""
from __future__ import annotations

from glmjax.config import GLMConfig
from glmjax.convert.engine import TensorRule

ident = lambda w: w  # noqa: E731


def _glm_layer_rules(cfg: GLMConfig, mlp_order: tuple[str, str]) -> dict[str, list[TensorRule]]:
    h, f, nh, d = cfg.hidden_size, cfg.inner_hidden_size, cfg.num_attention_heads, cfg.head_dim
    lay, att, mlp = "transformer.layers.{i}.", ("layers", "attention"), ("layers", "mlp")
    post = ("layers", "post_attention_layernorm")
    rules = {
        "input_layernorm": [
            TensorRule(lay + "input_layernorm.weight", ("layers", "input_layernorm", "scale"), (h,),
                       "replicated", ident, ident),
            TensorRule(lay + "input_layernorm.bias", ("layers", "input_layernorm", "bias"), (h,),
                       "replicated", ident, ident)],
        "attention": [
            # rows are [head][q|k|v][head_dim]: glmjax keeps that grouping, input dim first
            TensorRule(lay + "attention.query_key_value.weight", att + ("qkv_kernel",), (3 * h, h), "rows",
                       lambda w: w.reshape(nh, 3, d, h).transpose(3, 0, 1, 2),
                       lambda k: k.transpose(1, 2, 3, 0).reshape(3 * h, h), quantizable=True),
            TensorRule(lay + "attention.query_key_value.bias", att + ("qkv_bias",), (3 * h,), "rows",
                       lambda b: b.reshape(nh, 3, d), lambda b: b.reshape(3 * h)),
            TensorRule(lay + "attention.dense.weight", att + ("dense_kernel",), (h, h), "cols",
                       lambda w: w.T.reshape(nh, d, h), lambda k: k.reshape(h, h).T, quantizable=True),
            TensorRule(lay + "attention.dense.bias", att + ("dense_bias",), (h,), "replicated",
                       ident, ident)],
        "post_attention_layernorm": [
            TensorRule(lay + "post_attention_layernorm.weight", post + ("scale",), (h,), "replicated",
                       ident, ident),
            TensorRule(lay + "post_attention_layernorm.bias", post + ("bias",), (h,), "replicated",
                       ident, ident)],
        "dense_4h_to_h": [
            TensorRule(lay + "mlp.dense_4h_to_h.weight", mlp + ("wo_kernel",), (h, f), "cols",
                       lambda w: w.T, lambda k: k.T, quantizable=True),
            TensorRule(lay + "mlp.dense_4h_to_h.bias", mlp + ("wo_bias",), (h,), "replicated", ident, ident)],
    }
    if cfg.glu:  # merged rows are [all value rows; all gate rows]
        rules["dense_h_to_4h"] = [
            TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (2 * f, h), "glu",
                       lambda w: w.reshape(2, f, h).transpose(2, 0, 1),
                       lambda k: k.transpose(1, 2, 0).reshape(2 * f, h), quantizable=True),
            TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (2 * f,), "glu",
                       lambda b: b.reshape(2, f),
                       lambda b: b.reshape(2 * f))]
    else:
        rules["dense_h_to_4h"] = [
            TensorRule(lay + "mlp.dense_h_to_4h.weight", mlp + ("wi_kernel",), (f, h), "rows",
                       lambda w: w.T, lambda k: k.T, quantizable=True),
            TensorRule(lay + "mlp.dense_h_to_4h.bias", mlp + ("wi_bias",), (f,), "rows", ident, ident)]
    order = ["input_layernorm", "attention", "post_attention_layernorm", *mlp_order]
    return {k: rules[k] for k in order}


def _final_rules(cfg: GLMConfig) -> list[TensorRule]:
    h = cfg.hidden_size
    return [TensorRule("transformer.final_layernorm.weight", ("final_layernorm", "scale"), (h,),
                       "replicated", ident, ident),
            TensorRule("transformer.final_layernorm.bias", ("final_layernorm", "bias"), (h,),
                       "replicated", ident, ident)]


def _glm_table(cfg: GLMConfig, mlp_order: tuple[str, str]) -> list[TensorRule]:
    emb = TensorRule("transformer.word_embeddings.weight", ("word_embeddings",),
                     (cfg.vocab_size, cfg.hidden_size), "rows", ident, ident)
    layer = _glm_layer_rules(cfg, mlp_order)
    rules = [emb] + [r for group in layer.values() for r in group] + _final_rules(cfg)
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", ("lm_head",), (cfg.vocab_size, cfg.hidden_size),
                                "rows", ident, ident))
    return rules


def sat_rules(cfg: GLMConfig) -> list[TensorRule]:
    """GLM-130B's SAT state dict, in GLM130B.state_dict() order (SAT's GLU mixin re-creates
    dense_h_to_4h, so it comes after dense_4h_to_h)."""
    return _glm_table(cfg, ("dense_4h_to_h", "dense_h_to_4h"))


def hf_chatglm_rules(cfg: GLMConfig) -> list[TensorRule]:
    """ChatGLM-6B's Hugging Face state dict, in modeling_chatglm.py order."""
    return _glm_table(cfg, ("dense_h_to_4h", "dense_4h_to_h"))
