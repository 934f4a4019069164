"""Small convolutional (conditional) beta-VAE for 28x28 grayscale images, and the graphs the
device runs: the anomaly score and the decoder.

Invariant: every module here takes what the device feeds it (contract-normalised images,
latent vectors, one-hot labels) so the exported graphs need no pre- or post-processing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SCORE_METHODS", "ConvVAE", "DecoderGraph", "ScoreGraph", "fit_latent_gaussians"]

SCORE_METHODS = ("reconstruction", "latent", "combined")


class ConvVAE(nn.Module):
    """Encoder q(z|x[, y]), decoder p(x|z[, y]); `num_classes=0` is a plain VAE.

    In the cVAE the class enters only after the convolutional trunk (one trunk pass serves all
    classes when scoring). Conditioning the encoder too is what makes sampling controllable:
    with an unconditional encoder z learned the class itself and the decoder ignored the label
    (measured: samples of "Pullover" came out as sneakers).
    """

    def __init__(self, *, latent_dim: int = 16, num_classes: int = 0, width: int = 32,
                 input_mean: float = 0.0, input_std: float = 1.0) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.num_classes = num_classes
        w = width
        self.register_buffer("input_mean", torch.tensor(input_mean))
        self.register_buffer("input_std", torch.tensor(input_std))
        self.enc = nn.Sequential(
            nn.Conv2d(1, w, 4, 2, 1), nn.LeakyReLU(0.1),          # 14
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.LeakyReLU(0.1),      # 7
            nn.Flatten(), nn.Linear(2 * w * 49, 256), nn.LeakyReLU(0.1),
        )
        self.mu = nn.Linear(256 + num_classes, latent_dim)
        self.logvar = nn.Linear(256 + num_classes, latent_dim)
        self.dec_fc = nn.Sequential(nn.Linear(latent_dim + num_classes, 256), nn.LeakyReLU(0.1),
                                    nn.Linear(256, 2 * w * 49), nn.LeakyReLU(0.1))
        self.dec = nn.Sequential(
            nn.ConvTranspose2d(2 * w, w, 4, 2, 1), nn.LeakyReLU(0.1),   # 14
            nn.ConvTranspose2d(w, 1, 4, 2, 1),                          # 28 (logits)
        )
        self.width = w

    def to_unit(self, x: torch.Tensor) -> torch.Tensor:
        """Contract-normalised input -> pixels in [0, 1]."""
        return x * self.input_std + self.input_mean

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.enc(self.to_unit(x))

    def head(self, h: torch.Tensor, onehot: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.num_classes:
            if onehot is None:
                raise ValueError("a conditional VAE needs a class to encode")
            h = torch.cat([h, onehot], dim=1)
        return self.mu(h), self.logvar(h).clamp(-10, 10)

    def encode(self, x: torch.Tensor, onehot: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.trunk(x), onehot)

    def decode_logits(self, z: torch.Tensor, onehot: torch.Tensor | None = None) -> torch.Tensor:
        if self.num_classes:
            if onehot is None:
                raise ValueError("a conditional VAE needs a class to decode")
            z = torch.cat([z, onehot], dim=1)
        h = self.dec_fc(z).view(-1, 2 * self.width, 7, 7)
        return self.dec(h)

    def loss(self, x: torch.Tensor, y: torch.Tensor | None, *, beta: float
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean per-image (BCE reconstruction, KL) and the beta-weighted total."""
        onehot = F.one_hot(y, self.num_classes).float() if self.num_classes else None
        mu, logvar = self.encode(x, onehot)
        z = mu + torch.randn_like(mu) * (0.5 * logvar).exp()
        logits = self.decode_logits(z, onehot)
        target = self.to_unit(x).clamp(0, 1)
        rec = F.binary_cross_entropy_with_logits(logits, target, reduction="none").sum((1, 2, 3))
        kl = 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        return (rec + beta * kl).mean(), rec.mean(), kl.mean()


class ScoreGraph(nn.Module):
    """Image -> (score, reconstruction error, latent distance), one row per image.

    reconstruction: squared error of the decoded posterior mean (cVAE: of the class that
    reconstructs best); latent: Mahalanobis distance of the posterior mean (cVAE: for that
    class) to the training latents;
    combined: both standardised with validation statistics and summed. `score` is the one
    `method` names; the other two are extra outputs for measurement.
    """

    def __init__(self, vae: ConvVAE, *, latent_mean: torch.Tensor, latent_prec: torch.Tensor,
                 norm: tuple[float, float, float, float], method: str) -> None:
        super().__init__()
        if method not in SCORE_METHODS:
            raise ValueError(f"unknown score method {method!r}")
        self.vae = vae
        self.method = method
        self.register_buffer("latent_mean", latent_mean.float())
        self.register_buffer("latent_prec", latent_prec.float())
        self.register_buffer("norm", torch.tensor(norm, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        target = self.vae.to_unit(x)
        k = self.vae.num_classes
        h = self.vae.trunk(x)
        if k:
            n = h.shape[0]
            onehot = torch.eye(k, dtype=h.dtype).repeat(n, 1)
            mu, _ = self.vae.head(h.repeat_interleave(k, dim=0), onehot)
            recon = torch.sigmoid(self.vae.decode_logits(mu, onehot))
            err = (recon - target.repeat_interleave(k, dim=0)).pow(2).sum((1, 2, 3)).view(n, k)
            rec_err, best = err.min(dim=1)
            d = mu.view(n, k, -1) - self.latent_mean
            lat_all = ((d @ self.latent_prec) * d).sum(2)
            latent = lat_all.gather(1, best.unsqueeze(1)).squeeze(1)
        else:
            mu, _ = self.vae.head(h)
            recon = torch.sigmoid(self.vae.decode_logits(mu))
            rec_err = (recon - target).pow(2).sum((1, 2, 3))
            d = mu - self.latent_mean
            latent = ((d @ self.latent_prec) * d).sum(1)
        if self.method == "reconstruction":
            score = rec_err
        elif self.method == "latent":
            score = latent
        else:
            score = (rec_err - self.norm[0]) / self.norm[1] + (latent - self.norm[2]) / self.norm[3]
        return score, rec_err, latent


class DecoderGraph(nn.Module):
    """(z ~ N(0, I)[, one-hot label]) -> image in [0, 1].

    z is first mapped onto a Gaussian fitted to the training images' posterior means (per
    class for the cVAE): `mean[y] + chol[y] @ z`. Decoding raw prior samples gave grids in which
    about half the images were of another class (the latent still carries the class); sampling
    where the encoder actually puts each class keeps the class and sharpens the images.
    """

    def __init__(self, vae: ConvVAE, *, latent_mean: torch.Tensor, latent_chol: torch.Tensor
                 ) -> None:
        super().__init__()
        self.vae = vae
        self.register_buffer("latent_mean", latent_mean.float())  # [K or 1, D]
        self.register_buffer("latent_chol", latent_chol.float())  # [K or 1, D, D]

    def forward(self, z: torch.Tensor, label: torch.Tensor | None = None) -> torch.Tensor:
        if label is None:
            z = self.latent_mean[0] + z @ self.latent_chol[0].T
        else:
            chol = torch.einsum("nk,kde->nde", label, self.latent_chol)
            z = label @ self.latent_mean + (chol @ z.unsqueeze(-1)).squeeze(-1)
        return torch.sigmoid(self.vae.decode_logits(z, label))


def fit_latent_gaussians(mus: torch.Tensor, labels: torch.Tensor | None, num_classes: int
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-class (or one) mean and Cholesky factor of posterior means, ridge-regularised."""
    groups = ([mus[labels == c] for c in range(num_classes)] if num_classes else [mus])
    means, chols = [], []
    dim = mus.shape[1]
    eye = torch.eye(dim)
    pooled_mean = mus.mean(0)
    pooled_cov = torch.cov((mus - pooled_mean).T) if len(mus) > 1 else eye
    for g in groups:
        # A rare class has few samples (none, in a small subset): its covariance shrinks
        # toward the pooled one, with weight n / (n + dim), so it is always positive definite.
        n = len(g)
        m = g.mean(0) if n else pooled_mean
        own = torch.cov((g - m).T) if n > 1 else torch.zeros(dim, dim)
        w = n / (n + dim) if n > 1 else 0.0
        cov = w * own + (1 - w) * pooled_cov + 1e-3 * eye
        means.append(m)
        chols.append(torch.linalg.cholesky(cov))
    return torch.stack(means), torch.stack(chols)
