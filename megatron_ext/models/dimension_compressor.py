"""Hidden-state dimension compressor (LLM-TRM phase 1): a tied linear map [B, L, D] -> [B, L, D'] -> [B, L, D],
the PCA it can at best match, and the reconstruction metrics. torch and numpy only.

One bias-free matrix W (D' x D) encodes z = x W^T and decodes with its transpose, x_hat = z W = x W^T W. The
optimal W^T W of this tied linear autoencoder under MSE is the orthogonal projection onto the top-D' eigenvectors of
the uncentred second moment E[x x^T] (Baldi and Hornik 1989), so PCA on that moment is both the baseline a trained
map is compared with and an initialisation (`--init pca`). Every quantity is over the non-padding tokens only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class TiedLinearCompressor(torch.nn.Module):
    """z = x W^T (encode), x_hat = z W (decode with the transpose); W has orthonormal rows at initialisation.

    `basis` (D' x D, e.g. `pca_basis`) sets W instead of the orthogonal draw."""

    def __init__(
        self,
        d_model: int,
        d_compressed: int,
        basis: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not 0 < d_compressed < d_model:
            raise ValueError(f"d_compressed {d_compressed} must be in [1, d_model {d_model})")
        weight = torch.empty(d_compressed, d_model)
        if basis is None:
            torch.nn.init.orthogonal_(weight, generator=generator)
        else:
            if tuple(basis.shape) != (d_compressed, d_model):
                raise ValueError(f"basis of shape {tuple(basis.shape)}, expected {(d_compressed, d_model)}")
            weight.copy_(basis)
        self.weight = torch.nn.Parameter(weight)

    @property
    def d_model(self) -> int:
        return self.weight.shape[1]

    @property
    def d_compressed(self) -> int:
        return self.weight.shape[0]

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))


def _flat_tokens(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The rows of x [..., D] whose mask (x's leading shape, True = real token) is set, as [N, D]."""
    rows = x.reshape(-1, x.shape[-1])
    return rows if mask is None else rows[mask.reshape(-1).to(torch.bool)]


def masked_mse(x_hat: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of (x_hat - x)^2 over the real tokens and all dimensions (padding positions contribute nothing)."""
    err = (x_hat - x).square().sum(-1)
    if mask is None:
        return err.mean() / x.shape[-1]
    m = mask.to(err.dtype)
    return (err * m).sum() / (m.sum().clamp_min(1) * x.shape[-1])


class SecondMoment:
    """Streamed uncentred second moment E[x x^T] over real tokens, accumulated in float64."""

    def __init__(self, d_model: int) -> None:
        self.total = torch.zeros(d_model, d_model, dtype=torch.float64)
        self.count = 0

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        rows = _flat_tokens(x, mask).to(torch.float64)
        self.total.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    def matrix(self) -> torch.Tensor:
        if self.count == 0:
            raise ValueError("no tokens were accumulated")
        return self.total / self.count


def principal_axes(moment: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues descending, float64; eigenvectors as rows in the same order, float32) of the symmetric
    `moment`: the first D' rows are PCA's basis for D' (and `--init pca`'s W)."""
    values, vectors = torch.linalg.eigh(moment.to(torch.float64))
    order = values.argsort(descending=True)
    return values[order], vectors[:, order].T.contiguous().float()


class ReconstructionMetrics:
    """Streamed metrics of x_hat against x over real tokens (float64 sums):

    mse: mean over tokens and dimensions of (x_hat - x)^2; relative_error: mean over tokens of ||x_hat - x|| / ||x||;
    cosine: mean over tokens of cos(x_hat, x); variance_ratio: mean over dimensions d of Var(x_hat_d) / Var(x_d),
    variances over tokens (dimensions where x does not vary are left out)."""

    def __init__(self, d_model: int) -> None:
        z = lambda: torch.zeros(d_model, dtype=torch.float64)  # noqa: E731
        self.sq_err = self.rel_err = self.cosine = 0.0
        self.count = 0
        self.sum_x, self.sumsq_x, self.sum_h, self.sumsq_h = z(), z(), z(), z()

    def update(self, x: torch.Tensor, x_hat: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        x, h = _flat_tokens(x, mask).to(torch.float64), _flat_tokens(x_hat, mask).to(torch.float64)
        err = h - x
        self.sq_err += float(err.square().sum())
        self.rel_err += float((err.norm(dim=-1) / x.norm(dim=-1).clamp_min(1e-30)).sum())
        self.cosine += float(F.cosine_similarity(h, x, dim=-1).sum())
        self.count += x.shape[0]
        self.sum_x += x.sum(0)
        self.sumsq_x += x.square().sum(0)
        self.sum_h += h.sum(0)
        self.sumsq_h += h.square().sum(0)

    def result(self) -> dict[str, float]:
        n = self.count
        if n == 0:
            raise ValueError("no tokens were measured")
        var_x = self.sumsq_x / n - (self.sum_x / n).square()
        var_h = self.sumsq_h / n - (self.sum_h / n).square()
        varies = var_x > 1e-12 * var_x.max().clamp_min(1e-300)
        return {
            "mse": self.sq_err / (n * self.sum_x.numel()),
            "relative_error": self.rel_err / n,
            "cosine": self.cosine / n,
            "variance_ratio": float((var_h[varies] / var_x[varies]).mean()),
        }
