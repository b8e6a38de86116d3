"""What checking a batch against the round's bounds costs on the edge's step path
(``common.bounds.batch_problem``), beside ``isfinite(x).all()`` alone.

    python -m scripts.bench_bounds

Best of 7 rounds of 20 calls each, one intra-op thread (as the edge trains), for the
cuts of BENCHMARKS.md section 10. Prints one line per (batch, check).
"""

from __future__ import annotations

import time

import torch

from common.bounds import batch_problem, cut_row

CASES = [("vgg5", 3, 50), ("vgg5", 0, 25), ("resnet18", 2, 32)]  # (model, cut, rows)


def best_ms(fn, *, rounds: int = 7, calls: int = 20) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e3


def main() -> int:
    torch.set_num_threads(1)
    for model, cut, n in CASES:
        row, _ = cut_row(model, cut)
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(n, *row, generator=g), torch.randint(0, 10, (n,), generator=g)
        mb = x.numel() * x.element_size() / 1e6
        whole = best_ms(lambda: batch_problem(x, y, model=model, cut=cut, batch_size=n))
        mask = best_ms(lambda: bool(torch.isfinite(x).all()))
        print(f"{model} cut {cut} {n} rows ({mb:.1f} MB): batch_problem {whole:.3f} ms, "
              f"isfinite(x).all() {mask:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
