"""Writes the cases `tests/ir.rs` checks `conv1d` / `conv2d` against:
inputs, kernels and biases with torch.nn.functional's results and the
gradients of sum(y * r) for a random r, in float64, over strides, padding,
dilation and groups (depthwise and a ViT-style patch projection included);
and `cumsum` and `expand` the same way (torch.cumsum, Tensor.expand), each
case with the modelc expression of its x.

    pip install torch
    python3 tests/conv_fixtures.py   # rewrites tests/fixtures/conv.json and tests/fixtures/scans.json
"""

import json
import pathlib

import torch
import torch.nn.functional as F

OUT = pathlib.Path(__file__).resolve().parent / "fixtures" / "conv.json"
SCANS = OUT.parent / "scans.json"

# (x shape, the modelc expression, the same in torch)
SCAN_CASES = [
    ([3, 4], "cumsum(x, axis: 0)", lambda x: torch.cumsum(x, 0)),
    ([2, 3, 5], "cumsum(x)", lambda x: torch.cumsum(x, -1)),
    ([2, 3, 5], "cumsum(x * x, axis: 1)", lambda x: torch.cumsum(x * x, 1)),
    ([1, 4], "expand(x, [3, 4])", lambda x: x.expand(3, 4)),
    ([2, 1, 4], "expand(x, [2, 3, -1])", lambda x: x.expand(2, 3, -1)),
    ([4], "expand(x, [2, 3, 4])", lambda x: x.expand(2, 3, 4)),
]

# (x shape, weight shape, bias, stride, padding, dilation, groups)
CASES = [
    ([2, 4, 11], [6, 4, 3], True, [2], [1], [1], 1),
    ([2, 4, 9], [8, 2, 3], False, [1], [2], [2], 2),
    ([1, 3, 5], [3, 1, 4], True, [1], [3], [1], 3),  # causal depthwise (Mamba's)
    ([2, 3, 7, 6], [5, 3, 3, 3], True, [2, 1], [1, 1], [1, 1], 1),
    ([1, 4, 5, 5], [4, 1, 3, 2], False, [2, 2], [1, 0], [1, 2], 4),
    ([2, 3, 8, 8], [6, 3, 4, 4], True, [4, 4], [0, 0], [1, 1], 1),  # ViT patches
    ([1, 6, 4, 5], [4, 3, 1, 1], True, [1, 1], [0, 0], [1, 1], 2),
]


def rounded(t):
    return [round(v, 12) for v in t.detach().flatten().tolist()]


def main():
    torch.manual_seed(0)
    cases = []
    for xs, ws, has_bias, stride, padding, dilation, groups in CASES:
        x = torch.randn(xs, dtype=torch.float64, requires_grad=True)
        w = torch.randn(ws, dtype=torch.float64, requires_grad=True)
        b = torch.randn(ws[0], dtype=torch.float64, requires_grad=True) if has_bias else None
        conv = F.conv1d if len(xs) == 3 else F.conv2d
        y = conv(x, w, b, stride=stride, padding=padding, dilation=dilation, groups=groups)
        r = torch.randn(y.shape, dtype=torch.float64)
        (y * r).sum().backward()
        case = {
            "x": {"shape": xs, "data": rounded(x)},
            "weight": {"shape": ws, "data": rounded(w)},
            "stride": stride,
            "padding": padding,
            "dilation": dilation,
            "groups": groups,
            "r": {"shape": list(y.shape), "data": rounded(r)},
            "y": rounded(y),
            "grad_x": rounded(x.grad),
            "grad_weight": rounded(w.grad),
        }
        if has_bias:
            case["bias"] = rounded(b)
            case["grad_bias"] = rounded(b.grad)
        cases.append(case)
    OUT.write_text(json.dumps(cases, separators=(",", ":")) + "\n")
    print(f"{len(cases)} cases in {OUT}")
    scans = []
    for shape, expr, f in SCAN_CASES:
        x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
        y = f(x)
        r = torch.randn(y.shape, dtype=torch.float64)
        (y * r).sum().backward()
        scans.append({"expr": expr, "x": {"shape": shape, "data": rounded(x)},
                      "r": {"shape": list(y.shape), "data": rounded(r)}, "y": rounded(y), "grad_x": rounded(x.grad)})
    SCANS.write_text(json.dumps(scans, separators=(",", ":")) + "\n")
    print(f"{len(scans)} cases in {SCANS}")


if __name__ == "__main__":
    main()
