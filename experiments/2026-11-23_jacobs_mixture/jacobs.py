"""Finding 7: does a mixture of experts learn faster than one network of equal size? (Jacobs, Jordan, Nowlan &
Hinton 1991, "Adaptive mixtures of local experts": on vowel discrimination a mixture reached the error criterion in
about half the epochs of a backpropagation network.)

A synthetic task of that kind: 2-D inputs, uniform on [-1, 1]^2; in each quadrant the binary label follows a line of
its own (random angle through the quadrant's centre), so the task splits into 4 local sub-tasks, as the vowels of
different speakers do. Three learners with the same number of parameters (within 2%), each from 20 seeds:

  competitive mixture  4 experts (MLP 2-4-1, tanh) and a softmax gating network (linear); Jacobs et al.'s loss,
                       -log sum_i g_i p_i(y | x): each expert is pulled towards the cases it explains best
  blended mixture      the same networks, the experts' logits mixed by the gate, cross-entropy on the blend (what
                       moe-lab's router=soft computes; Jacobs et al. argue this makes experts cooperate, not compete)
  one network          an MLP 2-20-1 (tanh)

Each trains with Adam (lr 0.01, mini-batches of 50 from 1,000 training points) for up to 300 epochs; the number that
matters is the first epoch whose held-out accuracy (4,000 points) reaches 95%. Prints a table and writes
results.json; a few minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from moe_lab.analysis.stats import mean_interval, paired_difference_interval, paired_ratio_interval

EXPERTS, EXPERT_HIDDEN, MLP_HIDDEN = 4, 4, 20


def make_task(seed: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points of the 4-quadrant task; the task itself (its 4 lines) is fixed, only the points depend on `seed`."""
    angles = np.random.default_rng(0).uniform(0, np.pi, EXPERTS)
    normals = np.stack([np.cos(angles), np.sin(angles)], 1)  # (4, 2): each quadrant's line normal
    centres = np.array([[0.5, 0.5], [-0.5, 0.5], [-0.5, -0.5], [0.5, -0.5]])
    x = np.random.default_rng(seed).uniform(-1, 1, (n, 2))
    quadrant = np.where(x[:, 0] >= 0, np.where(x[:, 1] >= 0, 0, 3), np.where(x[:, 1] >= 0, 1, 2))
    y = ((x - centres[quadrant]) * normals[quadrant]).sum(1) > 0
    return torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32)


class Mixture(nn.Module):
    """Jacobs et al. 1991: experts and a gating network see the same input; the gate's softmax weighs the experts."""

    def __init__(self, competitive: bool):
        super().__init__()
        self.competitive = competitive
        self.gate = nn.Linear(2, EXPERTS)
        self.hidden = nn.Parameter(torch.randn(EXPERTS, 2, EXPERT_HIDDEN) * 0.5)
        self.hidden_bias = nn.Parameter(torch.zeros(EXPERTS, EXPERT_HIDDEN))
        self.out = nn.Parameter(torch.randn(EXPERTS, EXPERT_HIDDEN) * 0.5)
        self.out_bias = nn.Parameter(torch.zeros(EXPERTS))

    def expert_logits(self, x_N2: torch.Tensor) -> torch.Tensor:
        h_NEH = torch.tanh(torch.einsum("nd,edh->neh", x_N2, self.hidden) + self.hidden_bias)
        return (h_NEH * self.out).sum(-1) + self.out_bias  # (N, E)

    def loss(self, x_N2: torch.Tensor, y_N: torch.Tensor) -> torch.Tensor:
        log_gate_NE = F.log_softmax(self.gate(x_N2), -1)
        logits_NE = self.expert_logits(x_N2)
        if self.competitive:  # -log sum_i g_i p_i(y | x), the mixture's likelihood
            log_p_NE = -F.binary_cross_entropy_with_logits(
                logits_NE, y_N[:, None].expand_as(logits_NE), reduction="none"
            )
            return -torch.logsumexp(log_gate_NE + log_p_NE, -1).mean()
        return F.binary_cross_entropy_with_logits((log_gate_NE.exp() * logits_NE).sum(-1), y_N)

    def predict(self, x_N2: torch.Tensor) -> torch.Tensor:
        gate_NE = F.softmax(self.gate(x_N2), -1)
        logits_NE = self.expert_logits(x_N2)
        if self.competitive:  # the mixture's probability of class 1
            return (gate_NE * torch.sigmoid(logits_NE)).sum(-1) > 0.5
        return (gate_NE * logits_NE).sum(-1) > 0


class OneNetwork(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, MLP_HIDDEN), nn.Tanh(), nn.Linear(MLP_HIDDEN, 1))

    def loss(self, x_N2, y_N):
        return F.binary_cross_entropy_with_logits(self.net(x_N2).squeeze(-1), y_N)

    def predict(self, x_N2):
        return self.net(x_N2).squeeze(-1) > 0


LEARNERS = {
    "competitive mixture": lambda: Mixture(competitive=True),
    "blended mixture": lambda: Mixture(competitive=False),
    "one network": OneNetwork,
}


def epochs_to_criterion(learner: str, seed: int, criterion: float, max_epochs: int) -> tuple[float, float]:
    """(the first epoch whose held-out accuracy reaches `criterion`, inf if none; the accuracy then, or at the
    last epoch)."""
    torch.manual_seed(seed)
    x, y = make_task(seed, 1000)
    x_test, y_test = make_task(10_000 + seed, 4000)
    model = LEARNERS[learner]()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    order = torch.Generator().manual_seed(seed)
    accuracy = 0.0
    for epoch in range(1, max_epochs + 1):
        for batch in torch.randperm(len(x), generator=order).split(50):
            optimizer.zero_grad()
            model.loss(x[batch], y[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            accuracy = (model.predict(x_test) == y_test.bool()).float().mean().item()
        if accuracy >= criterion:
            return epoch, accuracy
    return math.inf, accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--criterion", type=float, default=0.95)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("-o", "--output", default="results.json")
    parser.add_argument("--figure", help="also draw the epochs per learner into this PNG (needs headless Chromium)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = {name: sum(p.numel() for p in make().parameters()) for name, make in LEARNERS.items()}
    results = {}
    for name in LEARNERS:
        runs = [epochs_to_criterion(name, seed, args.criterion, args.max_epochs) for seed in range(1, args.seeds + 1)]
        results[name] = {
            "parameters": sizes[name],
            "epochs": [r[0] for r in runs],
            "final_accuracy": [r[1] for r in runs],
        }
    print(f"epochs to {args.criterion:.0%} held-out accuracy, {args.seeds} seeds (inf: not within {args.max_epochs})")
    print(
        f"  {'learner':<20} {'params':>6} {'reached':>8} {'median':>7} {'mean [95% CI] over seeds that reached':>40} "
        f"{'accuracy at stop':>17}"
    )
    for name, r in results.items():
        reached = [e for e in r["epochs"] if math.isfinite(e)]
        i = mean_interval(reached)
        r["summary"] = {
            "reached": len(reached),
            "median": float(np.median(r["epochs"])),
            **i,
            "final_accuracy_mean": float(np.mean(r["final_accuracy"])),
        }
        print(
            f"  {name:<20} {r['parameters']:>6} {len(reached):>5}/{args.seeds} {np.median(r['epochs']):>7.1f} "
            f"{i['mean']:>24.1f} [{i['low']:.1f}, {i['high']:.1f}] {np.mean(r['final_accuracy']):>17.3f}"
        )
    # Paired by seed (the same training points, test points and batch order for every learner); a seed that never
    # reached the criterion counts as max_epochs + 1, which understates how slow that learner was.
    censored = {name: [min(e, args.max_epochs + 1) for e in r["epochs"]] for name, r in results.items()}
    # The claim is a ratio (about half the epochs), and a learner's epochs spread multiplicatively (a few seeds take
    # several times the median): the per-seed ratio's geometric mean, with the t interval of its logarithm, says
    # what the typical seed gains; the paired difference of means says what the average costs.
    for name in ("competitive mixture", "blended mixture"):
        mine, base = np.array(censored[name], float), np.array(censored["one network"], float)
        d = paired_difference_interval(mine, base)
        ratio = paired_ratio_interval(mine, base)
        faster = int((mine < base).sum())
        median_ratio = float(np.median(results[name]["epochs"]) / np.median(results["one network"]["epochs"]))
        results[name]["against_one_network"] = {
            "median_ratio": median_ratio,
            "geometric_mean_ratio": ratio,
            "seeds_faster": faster,
            **d,
        }
        print(
            f"  {name} / one network, per seed: geometric mean ratio {ratio['mean']:.3f} [{ratio['low']:.3f}, "
            f"{ratio['high']:.3f}], faster in {faster} of {len(mine)} seeds; difference {d['diff']:+.1f} epochs "
            f"[{d['low']:+.1f}, {d['high']:+.1f}] (paired by seed, p = {d['p']:.2g}); median ratio {median_ratio:.2f}"
        )
    Path(args.output).write_text(
        json.dumps(
            {"criterion": args.criterion, "max_epochs": args.max_epochs, "seeds": args.seeds, "results": results},
            indent=2,
        )
        + "\n"
    )
    if args.figure:
        draw(results, args)


def draw(results: dict, args) -> None:
    import sys

    import plotly.graph_objects as go

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from figure import write_png

    fig = go.Figure()
    for name, r in results.items():
        epochs = [e if math.isfinite(e) else args.max_epochs for e in r["epochs"]]
        fig.add_trace(
            go.Box(y=epochs, name=f"{name} ({r['parameters']} parameters)", boxpoints="all", jitter=0.4, pointpos=0)
        )
    fig.update_layout(
        title=f"epochs to {args.criterion:.0%} held-out accuracy, {args.seeds} seeds per learner "
        f"(a seed that never reached it is drawn at {args.max_epochs})",
        yaxis_title="epochs",
        template="plotly_white",
        height=420,
        showlegend=False,
        margin=dict(l=60, r=20, t=60, b=40),
    )
    write_png(fig, Path(args.figure), 900)


if __name__ == "__main__":
    main()
