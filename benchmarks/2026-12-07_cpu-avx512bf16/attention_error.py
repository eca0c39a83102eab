"""The error causal attention adds in bfloat16, against float64 from the same bfloat16-rounded inputs, at the tiny
model's shape: the flash kernel (scores and softmax in float32 inside) and an explicit form with the scores rounded to
bfloat16 and the softmax in bfloat16 (the fastest variant of attention_alone.py). Inputs of unit and 3x scale (scores
of standard deviation 1 and 9).

    python attention_error.py
"""

import torch
import torch.nn.functional as F


def main() -> None:
    torch.manual_seed(0)
    B, H, S, Dh = 16, 4, 256, 32
    mask = torch.ones(S, S, dtype=torch.bool).tril()
    for scale in (1.0, 3.0):
        q, k, v = (torch.randn(B, H, S, Dh).bfloat16() * scale for _ in range(3))
        reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
        flash = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        scores = (q @ k.transpose(-1, -2)) * Dh**-0.5
        bf16_softmax = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
        for name, out in (("flash bfloat16", flash), ("bf16 softmax", bf16_softmax)):
            err = (out.double() - reference).abs()
            rel_rms = err.pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
            print(
                f"inputs x{scale}: {name:14s} max abs err {err.max():.4f}  mean abs err {err.mean():.5f}  "
                f"relative rms {rel_rms:.5f}"
            )


if __name__ == "__main__":
    main()
