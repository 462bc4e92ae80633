"""The closed-form FLOPs of a Transformer forward: PaLM's formula (appendix B).

The traced count (:mod:`tiecheck.flops.trace`) is checked against this formula in the tests, and
the bench uses it for MFU where no trace is wanted: arithmetic on sizes read from a config.
"""

from __future__ import annotations

ATTENTION_MODES = ("full", "causal-half")


def analytic_flops(
    n_matmul_params: int,
    n_layers: int,
    seq_len: int,
    d_attn: int,
    batch_size: int = 1,
    attention: str = "full",
) -> int:
    """Forward FLOPs by the formula of PaLM (Chowdhery et al. 2022), appendix B.

    ``forward = batch_size * (2 * N * T + 4 * L * T**2 * d_attn)``

    * ``N`` (``n_matmul_params``): parameters used in matrix products -- every projection
      and MLP weight and the output projection (counted once per use even when tied to the
      embedding), but not embedding lookups, biases or norm gains.
    * ``L`` (``n_layers``): attention layers; ``T``: sequence length; ``d_attn``: query
      heads x head dimension (d_model in most models, also under grouped-query attention,
      whose smaller K/V heads change N but not the score products).
    * The attention term is QK^T plus AV, 2·T²·d_attn multiply-adds per layer, with the
      full score matrix. ``attention="causal-half"`` halves it (all L layers taken as
      causal).

    For an encoder-decoder with equal source and target lengths pass
    ``n_layers = L_enc + 2 * L_dec`` (decoder self- and cross-attention); with unequal
    lengths the formula does not apply as written. The training step is commonly taken
    as 3x the forward (PaLM's 6N + 12LHQT per token).
    """
    if attention not in ATTENTION_MODES:
        raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
    for name, v in (("n_matmul_params", n_matmul_params), ("n_layers", n_layers),
                    ("seq_len", seq_len), ("d_attn", d_attn), ("batch_size", batch_size)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    attn = 4 * n_layers * seq_len * seq_len * d_attn
    if attention == "causal-half":
        attn //= 2
    return batch_size * (2 * n_matmul_params * seq_len + attn)
