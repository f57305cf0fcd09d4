"""Quick start: curvature of a small CNN with curvlib.

Runs on the CPU in a few seconds:

    python examples/quickstart.py

1. One operation as a tensor network (``curvlib.functional``), checked against PyTorch.
2. The engine: GGN diagonal, KFAC-reduce factors, HesScale and the GGN Gram matrix of a CNN,
   computed by hooks during ``loss.backward()``.
"""

import torch
from torch import nn

import curvlib
from curvlib import functional as F
from curvlib.extensions import BatchGrad, DiagGGNExact, GGNGram, HesScale, KFACReduce

torch.manual_seed(0)

# 1. functional: the KFC factor and the GGN diagonal of one convolution, no unfolding
x = torch.randn(8, 3, 16, 16)
weight = torch.randn(6, 3, 3, 3)
s = torch.randn(10, 8, 6, 8, 8)  # backpropagated loss-Hessian square root [C, N, C_out, *O]
kfc = F.kfc(x, 3, stride=2, padding=1)
diag = F.ggn_diag(x, s, 3, stride=2, padding=1)
y = F.conv(x, weight, stride=2, padding=1)
print("functional:")
print(f"  conv matches torch:        {torch.allclose(y, nn.functional.conv2d(x, weight, stride=2, padding=1), atol=1e-4)}")
print(f"  KFC factor Ω:              {tuple(kfc.shape)}  (groups, C_in·K·K, C_in·K·K)")
print(f"  GGN diagonal:              {tuple(diag.shape)}  (weight-shaped)")

# 2. engine: hooks on any model
model = nn.Sequential(
    nn.Conv2d(3, 8, 3, padding=1),
    nn.ReLU(),
    nn.MaxPool2d(2),
    nn.Conv2d(8, 8, 3, padding=1, groups=2),
    nn.ReLU(),
    nn.Flatten(),
    nn.Linear(8 * 8 * 8, 10),
)
loss_fn = nn.CrossEntropyLoss()
X, labels = torch.randn(32, 3, 16, 16), torch.randint(0, 10, (32,))

gram = GGNGram()
with curvlib.curvature(model, loss_fn, DiagGGNExact(), KFACReduce(fisher="mc"), HesScale(), BatchGrad(), gram):
    loss = loss_fn(model(X), labels)
    loss.backward()

print("engine (per parameter):")
print(f"  {'parameter':10s} {'shape':>16s} {'diag GGN sum':>13s} {'HesScale sum':>13s} {'KFAC-reduce factors':>22s}")
for name, p in model.named_parameters():
    factors = p.kfac_reduce
    shapes = f"{tuple(factors.output.shape[1:])}x{tuple(factors.input.shape[1:])}"
    print(
        f"  {name:10s} {str(tuple(p.shape)):>16s} {p.diag_ggn_exact.sum().item():13.4e} "
        f"{p.diag_hesscale.sum().item():13.4e} {shapes:>22s}"
    )
eigenvalues = torch.linalg.eigvalsh(gram.gram.reshape(10 * 32, 10 * 32))
print(f"  GGN Gram matrix {tuple(gram.gram.shape)}: largest GGN eigenvalues {eigenvalues[-3:].flip(0).tolist()}")
print(f"  per-sample gradients sum to the gradient: "
      f"{all(torch.allclose(p.grad_batch.sum(0), p.grad, atol=1e-6) for p in model.parameters())}")
