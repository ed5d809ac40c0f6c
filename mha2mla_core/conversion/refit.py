"""Value refit: the least-squares value up-projection of a converted attention layer, under its own attention weights.

The SVD factors K_nope and V from the weights and the calibration statistics, before the converted keys exist. Once
the layer is built, the attention weights P_h of each query head h (from the compressed keys and the partial RoPE)
are fixed, and the head's output P_h C W_uv_g^T is linear in the up-projection W_uv_g (D, Rc) of its KV head g. So
W_uv_g has a closed form: the least-squares fit of the original heads' outputs O_h (what enters o_proj, which the
conversion keeps) over the calibration tokens, pooled over g's query heads:

    W_uv_g^T = (sum_h A_h^T A_h + lambda I)^-1  sum_h A_h^T O_h,     A_h = P_h C  (tokens, Rc): the layer's o_lat

with lambda 1e-8 of the mean diagonal. It corrects what the compressed keys and the dropped rotations did to the
attention pattern, which no factorisation of the weights alone can see.

Legend: n windows of L tokens, E hidden size, G KV heads, r query heads per KV head, D head dim, Rc latent width.
"""

from __future__ import annotations

import torch
from torch import nn

from mha2mla_core.modeling.modeling_mla import MLAAttention, rope_pair_cos_sin

RIDGE = 1e-8  # of the Gram matrix's mean diagonal, per KV head: exact conversions stay exact (float64)


@torch.no_grad()
def refit_values(
    attn: MLAAttention, source: nn.Module, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
    ridge: float = RIDGE, chunk: int = 8,
) -> None:
    """Re-solve `attn`'s value up-projection in place so that its heads' outputs match `source`'s on x.

    attn: the converted layer; source: the original attention it replaces (its o_proj is the one they share);
    x (n, L, E): the layer's calibration inputs (after input_layernorm); rope: the model's (cos, sin), (1, L, D);
    ridge: lambda as a fraction of each KV head's mean Gram diagonal; chunk: windows per forward. The source runs without a mask, as `stream_layers` runs it: causal in its sdpa / flash implementations.
    """
    g, d, rc, dn = attn.num_kv_heads, attn.head_dim, attn.kv_lora_rank, attn.nope_dim
    gram = torch.zeros(g, rc, rc, dtype=torch.float64, device=x.device)  # sum_h A_h^T A_h per KV head
    cross = torch.zeros(g, rc, d, dtype=torch.float64, device=x.device)  # sum_h A_h^T O_h
    w_uk, _, b_v = attn.up_weights()
    captured: list[torch.Tensor] = []
    hook = source.o_proj.register_forward_pre_hook(lambda module, args: captured.append(args[0]))
    try:
        for xs in x.split(chunk):
            b, s, _ = xs.shape
            cos, sin = (t.expand(b, -1, -1) for t in rope)  # (b, L, D)
            captured.clear()
            source(hidden_states=xs, position_embeddings=(cos, sin), attention_mask=None)
            o = captured[0].view(b, s, g, -1, d).permute(2, 0, 3, 1, 4).reshape(g, -1, d)  # (G, b*r*L, D)
            if b_v is not None:
                o = o - b_v[:, None].to(o.dtype)
            pair_cos, pair_sin = rope_pair_cos_sin(cos, sin, attn.rope_pairs)
            c_kv, k_pe = attn.project_latent(xs, pair_cos, pair_sin)
            q_pe, q_nope = attn.project_query(xs, pair_cos, pair_sin)
            q_lat = torch.einsum("bgrsd,gdc->bgrsc", q_nope, w_uk)  # (b, G, r, L, Rc)
            o_lat = attn.latent_attention(q_lat, q_pe, c_kv, k_pe, None)  # (b, G, r, L, Rc): P_h C
            a = o_lat.transpose(0, 1).reshape(g, -1, rc).double()  # (G, b*r*L, Rc), rows ordered as o's
            gram += a.transpose(1, 2) @ a
            cross += a.transpose(1, 2) @ o.double()
    finally:
        hook.remove()
    lam = ridge * gram.diagonal(dim1=1, dim2=2).mean(-1).clamp(min=1e-12)  # (G,)
    w_uv_t = torch.linalg.solve(gram + lam[:, None, None] * torch.eye(rc, dtype=gram.dtype, device=gram.device), cross)
    weight = attn.kv_b_proj.weight.view(g, dn + d, rc)  # the rows of kv_b_proj as `up_weights` reads them
    weight[:, dn:] = w_uv_t.transpose(1, 2).to(weight.dtype)
