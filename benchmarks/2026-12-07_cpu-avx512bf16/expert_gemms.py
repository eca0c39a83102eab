"""Where `experts=e64_fine`'s expert GEMMs lose against its dense twin's FFN: the six bfloat16 GEMMs of one MoE layer's
forward + backward (x W_in, a W_out, the two input gradients, the two weight gradients), 2 threads, timed as

    grouped    what the compiled step runs: torch._grouped_mm over 64 groups padded to 64 rows (today)
    one GEMM   the same padded rows and widths as one plain GEMM each (one expert's weights for all rows): the cost of
               these shapes without any per-group cost, a bound no grouping of them beats
    dense      the dense twin's FFN (`experts=dense`, width 384, 4096 tokens): the GEMMs the MoE step is compared with
    chunks     tried: every group cut into chunks of 128 rows, one torch.bmm over the chunks with each chunk's expert
               weights gathered (the per-chunk weight gradients summed per expert in float32)
    threads    tried: the experts split in two halves of about equal rows, each half's grouped GEMM on its own thread
               of one intra-op thread (outputs copied into one tensor); bit for bit the grouped result

The step of e64_fine has 4096 tokens x top-8 = 32,768 rows per layer, 512 per expert on average; the row counts here
are one fixed multinomial draw around that (a mildly unbalanced router, seed 0). Interleaved, rotating order, 11
rounds of 5 calls; ratios per round against `grouped`.

    python expert_gemms.py [E F ROWS]
"""

import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

D, TOKENS, DENSE_HIDDEN, ALIGN, CHUNK = 128, 4096, 384, 64, 128
BF16 = torch.bfloat16


def padded_offsets(counts_E: torch.Tensor, multiple: int) -> torch.Tensor:
    return torch.cumsum((counts_E + multiple - 1) // multiple * multiple, 0).to(torch.int32)


class Layer:
    """Random operands of one layer's six expert GEMMs, laid out in groups padded to `multiple` rows."""

    def __init__(self, counts_E: torch.Tensor, hidden: int, multiple: int):
        self.offs_E = padded_offsets(counts_E, multiple)
        rows = int(self.offs_E[-1])
        self.x = torch.randn(rows, D, dtype=BF16)  # the rows' inputs
        self.a = torch.randn(rows, hidden, dtype=BF16)  # the hidden activations
        self.grad_h = torch.randn(rows, 2 * hidden, dtype=BF16)  # the gradient of x W_in (gate and up)
        self.grad_y = torch.randn(rows, D, dtype=BF16)  # the gradient of the output
        E = len(counts_E)
        self.w_in = torch.randn(E, 2 * hidden, D, dtype=BF16)
        self.w_out = torch.randn(E, D, hidden, dtype=BF16)

    def operands(self, w_in: torch.Tensor, w_out: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(left, right) of the six GEMMs; a 3-d right operand is per group, a 2-d one means a weight gradient."""
        return [
            (self.x, w_in.transpose(-2, -1)),
            (self.a, w_out.transpose(-2, -1)),
            (self.grad_y, w_out),
            (self.grad_h, w_in),
            (self.grad_y.t(), self.a),
            (self.grad_h.t(), self.x),
        ]


def grouped(layer: Layer) -> Callable[[], None]:
    def run() -> None:
        for left, right in layer.operands(layer.w_in, layer.w_out):
            torch._grouped_mm(left, right, offs=layer.offs_E)

    return run


def one_gemm(layer: Layer) -> Callable[[], None]:
    def run() -> None:
        for left, right in layer.operands(layer.w_in[0], layer.w_out[0]):
            torch.mm(left, right)

    return run


def dense(hidden: int) -> Callable[[], None]:
    twin = Layer(torch.tensor([TOKENS]), hidden, 1)
    return one_gemm(twin)


def chunks(counts_E: torch.Tensor, hidden: int) -> Callable[[], None]:
    layer = Layer(counts_E, hidden, CHUNK)
    E = len(counts_E)
    chunk_expert = torch.repeat_interleave(torch.arange(E), (counts_E + CHUNK - 1) // CHUNK)
    n = len(chunk_expert)

    def run() -> None:
        w_in, w_out = layer.w_in.index_select(0, chunk_expert), layer.w_out.index_select(0, chunk_expert)
        x, a = layer.x.view(n, CHUNK, D), layer.a.view(n, CHUNK, hidden)
        grad_y, grad_h = layer.grad_y.view(n, CHUNK, D), layer.grad_h.view(n, CHUNK, 2 * hidden)
        torch.bmm(x, w_in.transpose(1, 2))
        torch.bmm(a, w_out.transpose(1, 2))
        torch.bmm(grad_y, w_out)
        torch.bmm(grad_h, w_in)
        for grad, inp, shape in ((grad_y, a, (E, D, hidden)), (grad_h, x, (E, 2 * hidden, D))):
            per_chunk = torch.bmm(grad.transpose(1, 2), inp)
            torch.zeros(shape).index_add_(0, chunk_expert, per_chunk.float())

    return run


def threads(layer: Layer) -> Callable[[], None]:
    pool = ThreadPoolExecutor(1, initializer=lambda: torch.set_num_threads(1))
    ends = layer.offs_E.tolist()
    half = min(range(1, len(ends)), key=lambda e: abs(2 * ends[e - 1] - ends[-1]))  # experts [0, half), [half, E)
    split = ends[half - 1]

    def halves(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        weight_grad = right.dim() == 2
        shape = (len(ends), left.shape[0], right.shape[1]) if weight_grad else (left.shape[0], right.shape[-1])
        out = left.new_empty(shape)

        def part(e0: int, e1: int, r0: int, r1: int) -> None:
            offs = layer.offs_E[e0:e1] - r0
            if weight_grad:
                out[e0:e1] = torch._grouped_mm(left[:, r0:r1], right[r0:r1], offs=offs)
            else:
                out[r0:r1] = torch._grouped_mm(left[r0:r1], right[e0:e1], offs=offs)

        second = pool.submit(part, half, len(ends), split, ends[-1])
        torch.set_num_threads(1)
        try:
            part(0, half, 0, split)
        finally:
            torch.set_num_threads(2)
        second.result()
        return out

    def run() -> None:
        for left, right in layer.operands(layer.w_in, layer.w_out):
            halves(left, right)

    for left, right in layer.operands(layer.w_in, layer.w_out):  # the same numbers as the grouped GEMM
        rows = int(layer.offs_E[-1])
        want, got = torch._grouped_mm(left, right, offs=layer.offs_E), halves(left, right)
        assert torch.equal(want, got) if right.dim() == 2 else torch.equal(want[:rows], got[:rows])
    return run


def main() -> None:
    torch.set_num_threads(2)
    E, hidden, rows = (int(a) for a in sys.argv[1:4]) if len(sys.argv) == 4 else (64, 48, 32768)
    torch.manual_seed(0)
    weights_E = torch.softmax(0.3 * torch.randn(E), 0)
    counts_E = torch.distributions.Multinomial(rows, weights_E).sample().long()
    layer = Layer(counts_E, hidden, ALIGN)
    variants = {
        "grouped": grouped(layer),
        "one GEMM": one_gemm(layer),
        "dense": dense(DENSE_HIDDEN),
        "chunks": chunks(counts_E, hidden),
        "threads": threads(layer),
    }
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {E} experts of width {hidden}, {rows} rows")
    print(f"rows per expert {int(counts_E.min())}-{int(counts_E.max())}, padded to {ALIGN}: {int(layer.offs_E[-1])}")
    names = list(variants)
    ms: dict[str, list[float]] = {name: [] for name in names}
    for r in range(11):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            variants[name]()
            start = time.perf_counter()
            for _ in range(5):
                variants[name]()
            ms[name].append((time.perf_counter() - start) / 5 * 1e3)
    print("six GEMMs of one layer (forward + backward), ms: median [2nd lowest, 2nd highest]; grouped / variant")
    for name in names:
        ratio = sorted(g / v for g, v in zip(ms["grouped"], ms[name]))
        low, high = sorted(ms[name])[1], sorted(ms[name])[-2]
        print(
            f"  {name:9s} {statistics.median(ms[name]):6.2f} [{low:.2f}, {high:.2f}]"
            f"   {statistics.median(ratio):.3f}x [{ratio[1]:.3f}, {ratio[-2]:.3f}]"
        )


if __name__ == "__main__":
    main()
