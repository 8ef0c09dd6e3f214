"""Hull-edge points at scale (issue 18): d = 2, the 4 corners of [-1, 1]^2 plus V - 4 points on its edges with
3-decimal (not dyadic) coordinates. Every edge point is an exact convex combination of two corners (unspeakable,
margin exactly 0), every corner speakable. Prints the scan's time, counts and stage timings per V.

    python benchmarks/bench_square_edges.py cone 100,300,3000
"""
import sys
import time

import numpy as np

import unspeakable


def square_edges(V: int, seed: int = 0) -> np.ndarray:
    """W_U [2, V]: the corners first, then V - 4 edge points."""
    rng = np.random.default_rng(seed)
    n = V - 4
    side, s = rng.integers(0, 4, n), np.round(rng.uniform(-0.999, 0.999, n), 3)
    one = np.ones(n)
    pts = np.select([side[:, None] == k for k in range(4)],
                    [np.stack(p, 1) for p in ((one, s), (-one, s), (s, one), (s, -one))])
    return np.vstack([[[1, 1], [1, -1], [-1, 1], [-1, -1]], pts]).T


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    domain = argv[0] if argv else "cone"
    for V in map(int, (argv[1] if len(argv) > 1 else "100,300").split(",")):
        W = square_edges(V)
        t0 = time.perf_counter()
        rep = unspeakable.scan(W, domain=domain, device="cpu", backend="torch")
        dt = time.perf_counter() - t0
        stages = ", ".join(f"{k} {v:.2f}" for k, v in rep.timings_s.items())
        print(f"{domain} V={V}: {dt:.2f} s, counts {rep.counts}, timings {stages}", flush=True)


if __name__ == "__main__":
    main()
