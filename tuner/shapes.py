"""The tensor table of a model from its GGUF metadata alone: every tensor's name, shape and role.

The same names, shapes and layer pattern as a converted file of the architecture, following the tensors llama.cpp's
loaders create (src/models/qwen35moe.cpp:43-138, and qwen35.cpp, qwen3next.cpp, qwen3moe.cpp beside it; ggml order
``{ne0, ne1, ne2}``). The built-in cards size their quants from it (:mod:`tuner.cards`) and the synthetic
GGUF writer (:mod:`tuner.synth`) writes it; the hyperparameters are read from the metadata by
:func:`tuner.layout.layout_from_metadata`, exactly as from a real header.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from tuner.layout import HYBRID_ARCHS, layout_from_metadata

TensorPlan = list[tuple[str, tuple[int, ...], str]]  # (name, ggml-order shape, role)
# Architectures whose attention normalises Q and K per head (llama and qwen2 do not).
QK_NORM_ARCHS = frozenset({"qwen35moe", "qwen35", "qwen3next", "qwen3", "qwen3moe"})
# Architectures with routed experts.
MOE_ARCHS = frozenset({"qwen35moe", "qwen3next", "qwen3moe", "qwen2moe"})


def tensor_shapes(metadata: Mapping[str, Any], n_vocab: int, *, tied_embeddings: bool = False) -> TensorPlan:
    """Every tensor of the model ``metadata`` describes: name, shape in ggml order, and role (``embd``, ``output``,
    ``norm`` for 1-D and small tensors, ``matrix``, ``router``, ``experts``), the role choosing a writer's type.
    ``tied_embeddings``: no ``output.weight`` (the output head reuses ``token_embd``)."""
    lay = layout_from_metadata(dict(metadata), ())
    e, hd = lay.n_embd, lay.head_k
    plan: TensorPlan = [("token_embd.weight", (e, n_vocab), "embd"), ("output_norm.weight", (e,), "norm")]
    if not tied_embeddings:
        plan.append(("output.weight", (e, n_vocab), "output"))
    hybrid = lay.arch in HYBRID_ARCHS
    recurrent = set(lay.recurrent_layers)
    key_dim = lay.ssm_d_state * lay.ssm_n_group
    value_dim = lay.ssm_d_inner
    for il in range(lay.n_layer_all):
        b = f"blk.{il}."
        plan.append((b + "attn_norm.weight", (e,), "norm"))
        plan.append((b + ("post_attention_norm.weight" if hybrid else "ffn_norm.weight"), (e,), "norm"))
        if il in recurrent:
            plan += [
                (b + "attn_qkv.weight", (e, key_dim * 2 + value_dim), "matrix"),
                (b + "attn_gate.weight", (e, value_dim), "matrix"),
                (b + "ssm_conv1d.weight", (lay.ssm_d_conv, key_dim * 2 + value_dim), "norm"),
                (b + "ssm_dt.bias", (lay.ssm_dt_rank,), "norm"),
                (b + "ssm_a", (lay.ssm_dt_rank,), "norm"),
            ]
            if lay.arch == "qwen3next":  # one fused beta/alpha projection (src/models/qwen3next.cpp)
                plan.append((b + "ssm_ba.weight", (e, 2 * lay.ssm_dt_rank), "matrix"))
            else:
                plan += [(b + "ssm_beta.weight", (e, lay.ssm_dt_rank), "matrix"),
                         (b + "ssm_alpha.weight", (e, lay.ssm_dt_rank), "matrix")]
            plan += [
                (b + "ssm_norm.weight", (lay.ssm_d_state,), "norm"),
                (b + "ssm_out.weight", (value_dim, e), "matrix"),
            ]
        else:
            n_head, n_head_kv = lay.n_head[il], lay.n_head_kv[il]
            q_rows = hd * n_head * (2 if hybrid else 1)  # the hybrids' Q projection carries the output gate
            plan += [
                (b + "attn_q.weight", (e, q_rows), "matrix"),
                (b + "attn_k.weight", (e, hd * n_head_kv), "matrix"),
                (b + "attn_v.weight", (e, hd * n_head_kv), "matrix"),
                (b + "attn_output.weight", (hd * n_head, e), "matrix"),
            ]
            if lay.arch in QK_NORM_ARCHS:
                plan += [(b + "attn_q_norm.weight", (hd,), "norm"), (b + "attn_k_norm.weight", (hd,), "norm")]
        if lay.arch in MOE_ARCHS:
            plan += [
                (b + "ffn_gate_inp.weight", (e, lay.n_expert), "router"),
                (b + "ffn_gate_exps.weight", (e, lay.n_ff_exp, lay.n_expert), "experts"),
                (b + "ffn_up_exps.weight", (e, lay.n_ff_exp, lay.n_expert), "experts"),
                (b + "ffn_down_exps.weight", (lay.n_ff_exp, e, lay.n_expert), "experts"),
            ]
            if lay.arch != "qwen3moe":
                plan += [
                    (b + "ffn_gate_inp_shexp.weight", (e,), "norm"),
                    (b + "ffn_gate_shexp.weight", (e, lay.n_ff_shexp), "matrix"),
                    (b + "ffn_up_shexp.weight", (e, lay.n_ff_shexp), "matrix"),
                    (b + "ffn_down_shexp.weight", (lay.n_ff_shexp, e), "matrix"),
                ]
        else:
            plan += [
                (b + "ffn_gate.weight", (e, lay.n_ff), "matrix"),
                (b + "ffn_up.weight", (e, lay.n_ff), "matrix"),
                (b + "ffn_down.weight", (lay.n_ff, e), "matrix"),
            ]
        if il >= lay.n_layer:  # the MTP (NextN) block
            plan += [
                (b + "nextn.eh_proj.weight", (2 * e, e), "matrix"),
                (b + "nextn.enorm.weight", (e,), "norm"),
                (b + "nextn.hnorm.weight", (e,), "norm"),
                (b + "nextn.shared_head_norm.weight", (e,), "norm"),
            ]
    return plan
