"""Damped inverses of batched symmetric positive semi-definite matrices (KFAC factors).

Two routes, both for a stack ``[G, D, D]`` and a damping per matrix:

- :func:`damped_inverse` — ``(M + δ I)⁻¹`` by a Cholesky factorisation; where it fails (a matrix
  not positive definite in the working precision) it is retried in float64, and only if that
  fails too an error names the fix (more damping).
- :func:`symmetric_eigh` — ``M = Q diag(λ) Qᵀ`` by ``torch.linalg.eigh``, retried in float64 if
  it does not converge; eigenvalues are clamped at zero (factors are PSD; negative values are
  round-off). :func:`inverse_from_eigh` turns it into ``Q diag(1/(λ + δ)) Qᵀ``.

Example::

    >>> A = torch.randn(2, 5, 3, dtype=torch.float64); A = A @ A.mT      # two rank-3 factors
    >>> inv = damped_inverse(A, torch.tensor([1e-3, 1e-2], dtype=torch.float64))
    >>> eye = torch.eye(5, dtype=torch.float64)
    >>> torch.allclose(inv[1] @ (A[1] + 1e-2 * eye), eye)
    True
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor


def _with_damping(matrix: Tensor, damping: Tensor) -> Tensor:
    eye = torch.eye(matrix.shape[-1], dtype=matrix.dtype, device=matrix.device)
    return matrix + damping.to(matrix.dtype).reshape(-1, 1, 1) * eye


def damped_inverse(matrix: Tensor, damping: Tensor) -> Tensor:
    """``(M_g + δ_g I)⁻¹`` for ``matrix`` ``[G, D, D]`` and ``damping`` ``[G]``, in ``matrix.dtype``.

    Cholesky in the matrix's dtype; on failure retried in float64 (the damping is added in float64,
    so a float32 factor whose damped form is positive definite only in higher precision succeeds).

    Raises:
        ValueError: the damped matrix is not positive definite even in float64.
    """
    damped = _with_damping(matrix, damping)
    factor, info = torch.linalg.cholesky_ex(damped)
    if bool((info == 0).all()):
        return torch.cholesky_inverse(factor)
    damped64 = _with_damping(matrix.to(torch.float64), damping.to(torch.float64))
    factor, info = torch.linalg.cholesky_ex(damped64)
    if not bool((info == 0).all()):
        smallest = torch.linalg.eigvalsh(damped64).min().item()
        raise ValueError(
            f"KFAC factor of shape {tuple(matrix.shape)} plus damping is not positive definite even in float64 "
            f"(smallest eigenvalue {smallest:.3e}): increase damping (got {damping.min().item():.3e})"
        )
    return torch.cholesky_inverse(factor).to(matrix.dtype)


def symmetric_eigh(matrix: Tensor) -> Tuple[Tensor, Tensor]:
    """Eigenvalues ``[G, D]`` (clamped at 0) and eigenvectors ``[G, D, D]`` of symmetric ``matrix``.

    ``torch.linalg.eigh`` in the matrix's dtype, retried in float64 if it fails to converge.
    """
    try:
        values, vectors = torch.linalg.eigh(matrix)
    except RuntimeError:  # torch.linalg.LinAlgError: no convergence (ill-conditioned float32 input)
        values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
        values, vectors = values.to(matrix.dtype), vectors.to(matrix.dtype)
    return values.clamp(min=0), vectors


def inverse_from_eigh(values: Tensor, vectors: Tensor, damping: Tensor) -> Tensor:
    """``Q diag(1 / (λ + δ)) Qᵀ`` per matrix (``values`` ``[G, D]``, ``damping`` ``[G]``)."""
    scale = 1.0 / (values + damping.to(values.dtype).reshape(-1, 1))
    return (vectors * scale[:, None, :]) @ vectors.mT
