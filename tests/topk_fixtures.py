"""Writes the cases `tests/ir.rs` checks `topk`'s order against: rows full
of ties (and some NaN) with torch.topk's indices for them, as a router of
tied experts meets them. The order of equal values is libstdc++'s
(std::nth_element, std::partial_sort), which modelc's `ir::topk` follows.

    pip install torch
    python3 tests/topk_fixtures.py          # rewrites tests/fixtures/topk.json
"""

import json
import pathlib
import random

import torch

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "topk.json"


def main():
    rng = random.Random(0)
    cases = []
    for n in [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 64, 65, 127, 128, 129, 200]:
        for k in sorted({1, 2, 3, 4, 8, 17, n}):
            if k > n:
                continue
            for pattern in ["equal", "three", "mixed", "nan"]:
                if pattern == "equal":
                    row = [0.0] * n
                elif pattern == "three":
                    row = [float(rng.randrange(3)) for _ in range(n)]
                elif pattern == "mixed":
                    row = [float(rng.randrange(n)) / 4 for _ in range(n)]
                else:
                    row = [float("nan") if rng.random() < 0.2 else float(rng.randrange(2)) for _ in range(n)]
                got = torch.topk(torch.tensor(row, dtype=torch.float32), k).indices.tolist()
                cases.append({"row": [None if v != v else v for v in row], "k": k, "indices": got})
    OUT.write_text(json.dumps(cases, separators=(",", ":")) + "\n")
    print(f"{len(cases)} cases in {OUT}")


if __name__ == "__main__":
    main()
