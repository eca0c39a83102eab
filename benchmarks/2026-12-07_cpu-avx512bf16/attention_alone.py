"""Causal attention alone, forward + backward, at the tiny model's shape (batch 16, 4 heads, 256 positions, head
width 32) on this CPU: the flash kernel in bfloat16 (what bf16-mixed runs), an explicit softmax(QK^T / sqrt(d))V
compiled by inductor (float32 softmax), the flash kernel in float32 with the bfloat16 inputs upcast, the same explicit
form eager (float32 softmax), eager with the scores and softmax in bfloat16 (scores rounded to bfloat16 before the
softmax, which the flash kernel keeps in float32), and SDPA's math backend. Interleaved, rotating order, 15 rounds of 2
calls; the ratio is per round (flash bfloat16's time / the variant's).

    python attention_alone.py [B H S Dh]
"""

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def main() -> None:
    torch.set_num_threads(2)
    B, H, S, Dh = (int(a) for a in sys.argv[1:5]) if len(sys.argv) == 5 else (16, 4, 256, 32)
    bf16 = torch.bfloat16
    q, k, v = (torch.randn(B, H, S, Dh, dtype=bf16, requires_grad=True) for _ in range(3))
    grad = torch.randn(B, H, S, Dh, dtype=bf16)

    def explicit(q, k, v):
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) * Dh**-0.5
        return scores.float().masked_fill(~mask, float("-inf")).softmax(-1).to(v.dtype) @ v

    def explicit_bf16_softmax(q, k, v):
        mask = torch.ones(S, S, dtype=torch.bool).tril()
        scores = (q @ k.transpose(-1, -2)) * Dh**-0.5
        return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v

    def math_backend(q, k, v):
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    compiled = torch.compile(explicit)
    variants = {
        "flash bfloat16": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True).backward(grad),
        "compiled explicit": lambda: compiled(q, k, v).backward(grad),
        "flash float32": lambda: (
            F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True).to(bf16).backward(grad)
        ),
        "eager explicit": lambda: explicit(q, k, v).backward(grad),
        "eager bf16 softmax": lambda: explicit_bf16_softmax(q, k, v).backward(grad),
        "math backend": lambda: math_backend(q, k, v).backward(grad),
    }
    for call in variants.values():
        for _ in range(3):
            call()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(15):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            variants[name]()
            variants[name]()
            times[name].append((time.perf_counter() - start) / 2 * 1e3)
    for name in names:
        ratios = sorted(a / b for a, b in zip(times["flash bfloat16"], times[name]))
        print(
            f"{(B, H, S, Dh)} {name:18s} {statistics.median(times[name]):6.1f} ms; flash bfloat16 / this "
            f"{statistics.median(ratios):.2f} [{ratios[2]:.2f}, {ratios[-3]:.2f}]"
        )


if __name__ == "__main__":
    main()
