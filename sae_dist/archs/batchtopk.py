"""BatchTopK SAE (Bussmann et al. 2024): the batch's B * k largest activations, any number per token,
with AuxK for dead latents; at inference a per-SAE threshold (the running minimum selected
activation) replaces the batch, so it exports as a JumpReLU with one threshold for all latents.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist.archs import register
from sae_dist.archs.base import SaeOutput, ThresholdEncoder, fired_from_sparse
from sae_dist.archs.topk import TopK, TopKConfig, auxk_loss, encode_with_aux

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class BatchTopKConfig(TopKConfig):
    arch: str = "batchtopk"
    encoder_scale: float = 1.0
    """As topk's; 1.0 (the plain transpose) here: the automatic scale is measured for topk only so far."""


@register
class BatchTopK(TopK):
    name = "batchtopk"
    config = BatchTopKConfig
    saelens_architecture = "jumprelu"
    replicated = ("threshold",)
    export_per_latent = ("threshold",)

    def __init__(self, cfg: BatchTopKConfig) -> None:
        super().__init__(cfg)
        self.inference_encoder = ThresholdEncoder(max_active=2**62)  # as many as pass the threshold

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        sae.register_buffer("threshold", torch.tensor(-1.0))  # < 0 until the first training batch

    def select(
        self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None
    ) -> tuple[Tensor, Tensor, tuple | None]:
        """Training-mode selection -> (values (B, c), local ids (B, c), AuxK inputs or None); zeros are
        unselected candidates. Updates the inference threshold."""
        xc = sae.comm.shard_input(x - sae.b_dec)
        width = min(sae.n_local, 4 * self.cfg.k)
        while True:
            cand, idx, aux, aux_ids, total_dead = encode_with_aux(sae, xc, width, dead_mask)
            vals, idx, saturated = sae.comm.select_batch_topk(cand, idx, x.shape[0] * self.cfg.k)
            if not saturated or width >= sae.n_local:
                break
            width = min(sae.n_local, 2 * width)  # a row wanted more than its candidates: widen
        vals = F.relu(vals)
        if sae.training:
            self._track_threshold(sae, vals)
        return vals, idx, (aux, aux_ids, total_dead) if total_dead is not None else None

    @torch.no_grad()
    def _track_threshold(self, sae: SparseAutoencoder, vals: Tensor) -> None:
        positive = vals[vals > 0]
        low = positive.min() if positive.numel() else vals.new_tensor(float("inf"))
        low = sae.comm.min_scalar(low)
        t = sae.threshold
        if torch.isfinite(low):  # a batch where nothing fired says nothing about the threshold
            sae.threshold.copy_(torch.where(t < 0, low, 0.99 * t + 0.01 * low))

    def pick(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> tuple[Tensor, Tensor, tuple | None]:
        """The codes of this forward: the inference threshold's in eval mode once trained, else the
        batch selection -> (values, local ids, AuxK inputs or None)."""
        if not sae.training and sae.threshold >= 0:
            return (*self.encode_sparse(sae, x), None)
        return self.select(sae, x, dead_mask)

    def finish(
        self, sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, loss: Tensor, terms: dict, vals: Tensor, idx: Tensor,
        aux: tuple | None,
    ) -> SaeOutput:
        """Adds AuxK (where latents are dead) and L0 to the reconstruction loss and terms."""
        if aux is not None:
            aux_loss = auxk_loss(sae, x, x_hat, *aux)
            loss = loss + self.cfg.aux_coef * aux_loss
            terms["auxk"] = aux_loss.detach()
        terms["l0"] = sae.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, vals, idx))

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        vals, idx, aux = self.pick(sae, x, dead_mask)
        x_hat = sae.decode_sparse(vals, idx)
        loss = sae.fvu(x, x_hat)
        return self.finish(sae, x, x_hat, loss, {"fvu": loss.detach()}, vals, idx, aux)

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        """Every latent above the learned threshold (any number per token), as the JumpReLU export does."""
        if sae.threshold < 0:  # never trained: per-token top-k
            return super().encode_sparse(sae, x)
        xc = sae.comm.shard_input(x - sae.b_dec)
        t = sae.threshold.to(xc.dtype).expand(sae.n_local)
        pre, idx, valid = self.inference_encoder(sae, xc, t, 0.0)
        return pre * valid, idx

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        return {"threshold": torch.full((sae.n_local,), float(sae.threshold.clamp_min(0)))}

    def export_fields(self) -> dict:
        return {}

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        sae.threshold.fill_(float(tensors["threshold"][0]))

    @classmethod
    def config_from_export(cls, cfg: dict) -> dict:
        return {}
