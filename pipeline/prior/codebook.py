"""The autoregressive prior's discrete code for an image embedding (DALL-E 2 section 2.2).

DALL-E 2 turns z_i into a sequence of discrete codes before an autoregressive model can predict
it: PCA keeps the leading components (319 of 1024 dimensions in the paper, "nearly all of the
information"), and each component is quantized into 1024 buckets. The quantized dot product
z_i . z_t is a further token the prior is conditioned on, and at sampling time drawn from the top
half of its distribution (the paper: "sampling from the top half of this distribution").

Here every quantizer is fit on the training split's embeddings and kept as buffers of
:class:`Codebook`, so that it is saved with the model's weights (``model.safetensors``):

    mean        [D]          the training z_i's mean (PCA centers on it)
    components  [K, D]       the leading K principal directions, rows orthonormal
    edges       [K, N - 1]   per component, the quantile edges of its N equal-mass buckets
    centers     [K, N]       per component, the mean training value inside each bucket (decoding)
    dot_edges   [M - 1]      the quantile edges of z_i . z_t's M equal-mass buckets

Equal-mass buckets make "the top half of the distribution" the upper M/2 buckets.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def quantile_edges(x: torch.Tensor, buckets: int) -> torch.Tensor:
    """Edges [..., buckets - 1] that split the last dimension of ``x`` [..., N] into equal-mass
    buckets (interior quantiles; exact, by sorting)."""
    q = torch.arange(1, buckets, dtype=torch.float64) / buckets
    return torch.quantile(x.double(), q.to(x.device), dim=-1).movedim(0, -1).float()


def bucketize_rows(x: torch.Tensor, edges: torch.Tensor) -> torch.Tensor:
    """Bucket index per element of ``x`` [B, K] against each column's edges [K, N - 1] -> long [B, K]."""
    return torch.searchsorted(edges.contiguous(), x.t().contiguous(), right=True).t()


class Codebook(nn.Module):
    """PCA + per-component quantile quantizer of unit image embeddings, and the dot-product
    quantizer. Build with the sizes, then :meth:`fit` once on the training split."""

    def __init__(self, embed_dim: int, components: int, buckets: int, dot_buckets: int):
        super().__init__()
        if not 1 <= components <= embed_dim:
            raise ValueError(f"components must be in 1..{embed_dim} (the embedding's width), got {components}")
        if buckets < 2 or dot_buckets < 2 or dot_buckets % 2:
            raise ValueError("buckets >= 2 and an even dot_buckets >= 2 are needed (the top half is sampled)")
        self.embed_dim, self.n_components, self.buckets, self.dot_buckets = embed_dim, components, buckets, dot_buckets
        self.register_buffer("mean", torch.zeros(embed_dim))
        self.register_buffer("components", torch.zeros(components, embed_dim))
        self.register_buffer("edges", torch.zeros(components, buckets - 1))
        self.register_buffer("centers", torch.zeros(components, buckets))
        self.register_buffer("dot_edges", torch.zeros(dot_buckets - 1))
        self.register_buffer("explained_variance", torch.zeros(()))   # fraction kept by the K components

    @torch.no_grad()
    def fit(self, z_i: torch.Tensor, z_t: torch.Tensor) -> dict:
        """Fit PCA and both quantizers on training embeddings z_i, z_t [N, D] (unit norm). Returns
        the fit's figures: the variance the components keep and the round trip's cosines."""
        z_i, z_t = z_i.float(), z_t.float()
        self.mean.copy_(z_i.mean(0))
        centered = z_i - self.mean
        # principal directions: right singular vectors of the centered data, largest first
        _, s, vh = torch.linalg.svd(centered, full_matrices=False)
        var = s.square()
        self.components.copy_(vh[:self.n_components])
        self.explained_variance.fill_((var[:self.n_components].sum() / var.sum()).item())
        coords = centered @ self.components.t()                                   # [N, K]
        self.edges.copy_(quantile_edges(coords.t(), self.buckets))
        codes = bucketize_rows(coords, self.edges)                                 # [N, K]
        sums = torch.zeros(self.n_components, self.buckets).scatter_add_(1, codes.t(), coords.t())
        counts = torch.zeros(self.n_components, self.buckets).scatter_add_(1, codes.t(), torch.ones_like(coords.t()))
        # a bucket no training value fell into (ties in the data) decodes to its edges' midpoint
        lo = torch.cat([self.edges[:, :1], self.edges], 1)
        hi = torch.cat([self.edges, self.edges[:, -1:]], 1)
        self.centers.copy_(torch.where(counts > 0, sums / counts.clamp(min=1), (lo + hi) / 2))
        self.dot_edges.copy_(quantile_edges((z_i * z_t).sum(-1), self.dot_buckets))
        return self.round_trip(z_i)

    @torch.no_grad()
    def round_trip(self, z_i: torch.Tensor) -> dict:
        """How much of z_i [N, D] the code keeps: mean cos(z_i, PCA only) and cos(z_i, PCA + buckets)."""
        z_i = z_i.float()
        pca_only = F.normalize(self.mean + ((z_i - self.mean) @ self.components.t()) @ self.components, dim=-1)
        coded = self.decode(self.encode(z_i))
        cos = lambda a: F.cosine_similarity(a, z_i, dim=-1)               # noqa: E731
        return {"components": self.n_components, "buckets": self.buckets,
                "explained_variance": round(self.explained_variance.item(), 4),
                "cos_pca": round(cos(pca_only).mean().item(), 4),
                "cos_quantized": round(cos(coded).mean().item(), 4),
                "cos_quantized_min": round(cos(coded).min().item(), 4)}

    def encode(self, z_i: torch.Tensor) -> torch.Tensor:
        """Codes long [B, K] of image embeddings [B, D]."""
        return bucketize_rows((z_i.float() - self.mean) @ self.components.t(), self.edges)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Unit image embeddings [B, D] of codes [B, K]: bucket centers back through PCA."""
        coords = self.centers.gather(1, codes.t()).t()                            # [B, K]
        return F.normalize(self.mean + coords @ self.components, dim=-1)

    def dot_code(self, z_i: torch.Tensor, z_t: torch.Tensor) -> torch.Tensor:
        """The quantized z_i . z_t, long [B]."""
        return torch.bucketize((z_i.float() * z_t.float()).sum(-1), self.dot_edges, right=True)

    def sample_dot_code(self, n: int, generator=None, device=None) -> torch.Tensor:
        """n draws from the top half of z_i . z_t's training distribution (equal-mass buckets)."""
        half = self.dot_buckets // 2
        return torch.randint(half, self.dot_buckets, (n,), generator=generator).to(device or self.mean.device)
