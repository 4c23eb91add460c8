"""TopK SAE with AuxK (Gao et al. 2024): exactly k latents per token; dead latents learn the residual.

    f = TopK_k(relu((x - b_dec) W_enc^T + b_enc))
    loss = FVU(x, f W_dec + b_dec) + aux_coef * FVU(e, TopK_kaux over dead latents decoded),  e = x - x^
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist import kernels
from sae_dist.archs import register
from sae_dist.archs.base import Arch, SaeConfig, SaeOutput, fired_from_sparse
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class TopKConfig(SaeConfig):
    arch: str = "topk"
    k_aux: int = 0
    """AuxK: dead latents used to model the residual; 0 means d_model // 2 (Gao et al.)."""
    aux_coef: float = 1.0 / 32
    """Weight of the AuxK loss."""
    encoder_scale: float = 0.0
    """The encoder starts as this multiple of the decoder's transpose. 0 = automatic: the least-squares
    scale of the first batch's reconstruction (`TopK.init_from_batch`), about 0.6 at k = 32, where the
    plain transpose (1.0, Gao et al.) makes k correlated unit directions overshoot every token
    (docs/training.md)."""

    revive_after: float = 16.0
    """Revival of starving latents (the trainer's `revive`; docs/training.md, "Reviving starving
    latents"): a latent that has not fired for max(revive_after x n / k, trainer.total_tokens / 64)
    tokens (n / k: the interval at which an average latent fires) gets its b_enc raised by revive_step
    at every step until it fires again, no higher than revive_cap. A frequency-sensitive bias, as in
    DeSieno's (1988) "conscience" for competitive learning: a latent that keeps narrowly losing the
    top-k is pushed into it, where the gradient then trains it like any other. Applies to the families
    that select k latents per token (topk, the transcoders, the crosscoder; on by default for topk
    alone, see TranscoderConfig); 0 turns it off. On the default data's held-out tokens at n = 49152
    it cuts the latents that never fire from 28.22% to 7.71% at batch 4096 (FVU 0.1222 -> 0.1265) and
    from 10.13% to 3.97% at batch 16384; at n = 6144 it leaves 1.0-4.7% of them dead (1.6-3.0% without
    it)."""
    revive_step: float = 0.04
    """The raise per step, as a fraction of the batch's mean k-th activation (the smallest value a
    token selects): 0.04 brings a latent over the typical gap of a starving one (0.05-0.2 of it) in
    a few steps without overshooting; a step of 0.17 (batch 16384 with a rate per token) made latents
    fire on far too many tokens (FVU 0.52)."""
    revive_cap: float = 1.0
    """Revival raises b_enc no higher than this times the mean k-th activation: a latent whose encoder
    learns to point away from the data each time it fires (its decoder has not learned anything yet)
    otherwise climbs without bound (b_enc 12-14 times the k-th activation at n = 6144, batch 1024). At
    n = 49152 the latents that come back need up to about 1 (a cap of 0.25 left 27.49% dead at batch
    4096)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k_aux >= 0, f"sae.k_aux ({self.k_aux}) must be >= 0 (0 = d_model // 2)")
        require(self.aux_coef >= 0, f"sae.aux_coef ({self.aux_coef}) must be >= 0 (0 turns AuxK off)")
        require(self.encoder_scale >= 0, f"sae.encoder_scale ({self.encoder_scale}) must be >= 0 (0 = automatic)")
        require(self.revive_after >= 0, f"sae.revive_after ({self.revive_after}) must be >= 0 (0 turns revival off; use 16)")
        require(self.revive_step >= 0, f"sae.revive_step ({self.revive_step}) must be >= 0; use 0.04")
        require(self.revive_cap >= 0, f"sae.revive_cap ({self.revive_cap}) must be >= 0; use 1.0")


def encode_with_aux(
    sae: SparseAutoencoder, xc: Tensor, width: int, dead_mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """The streaming encoder's `width` best candidates per row, and, when some latent of any shard is
    dead, the best k_aux dead ones -> (cand, ids, aux, aux ids, total dead or None)."""
    cfg = sae.cfg
    total_dead = sae.comm.sum_scalar(dead_mask.sum().float()) if dead_mask is not None else None
    use_aux = total_dead is not None and bool(total_dead > 0) and getattr(cfg, "aux_coef", 0) > 0
    k_aux = min(sae.k_aux, sae.n_local)
    cand, ids, aux, aux_ids = kernels.topk_encode(
        xc, sae.W_enc, sae.b_enc, width, sae.encoder_chunk, dead_mask if use_aux else None, k_aux
    )
    return cand, ids, aux, aux_ids, total_dead if use_aux else None


def auxk_loss(sae: SparseAutoencoder, x: Tensor, x_hat: Tensor, aux: Tensor, aux_ids: Tensor, total_dead: Tensor) -> Tensor:
    """FVU of the residual x - x^ (no gradient into x^) by the top k_aux dead latents over every shard,
    scaled down while fewer than k_aux latents are dead."""
    k_aux_global = int(min(sae.k_aux, total_dead))
    aux = aux.masked_fill(~aux.isfinite(), 0.0)
    a_vals, a_idx = sae.comm.select_topk(aux, aux_ids, min(k_aux_global, aux.shape[1] * sae.comm.n_shards))
    e_hat = sae.comm.sum_partial(kernels.sparse_decode(F.relu(a_vals), a_idx, sae.W_dec))
    aux_loss = sae.fvu((x - x_hat).detach(), e_hat).nan_to_num(0.0)
    return aux_loss * min(1.0, float(total_dead) / sae.k_aux)


@register
class TopK(Arch):
    name = "topk"
    config = TopKConfig
    saelens_architecture = "topk"
    uses_dead_mask = True

    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """W_enc times sae.encoder_scale, or when that is 0 times s = <t - o, r> / <r, r> summed over the
        batch and every data replica: t the target, o = b_dec plus any skip path, r the batch's decoded
        top-k at the initial encoder less o; the scale at which the first reconstruction is
        least-squares right. b_enc is 0 here, so scaling the encoder leaves every selection as it is."""
        sae.W_enc.mul_(self._first_scale(sae, x))

    def _first_scale(self, sae: SparseAutoencoder, x: Tensor) -> float:
        """sae.encoder_scale, or when that is 0 the least-squares scale of the batch x (init_from_batch)."""
        s = self.cfg.encoder_scale
        if not s:
            target = self.split(x)[1]
            skip = self.skip(sae, x)
            tc = target - sae.b_dec - skip
            r = self.decode(sae, x, *self.encode_sparse(sae, x)) - sae.b_dec - skip
            num = sae.comm.mean_over_data((tc * r).sum().double())
            den = sae.comm.mean_over_data(r.pow(2).sum().double())
            s = float(num / den) if float(den) > 0 and float(num) > 0 else 1.0
        return s

    def encoder_input(self, sae: SparseAutoencoder, x_in: Tensor) -> Tensor:
        """What the encoder multiplies, from what `split` gives it: x - b_dec for an SAE (b_dec lives
        in the space it reads)."""
        return x_in - sae.b_dec

    def skip(self, sae: SparseAutoencoder, x: Tensor) -> Tensor | float:
        """The reconstruction's part outside the dictionary (a skip-transcoder's linear map): none here."""
        return 0.0

    def reconstruction_loss(self, sae: SparseAutoencoder, x: Tensor, target: Tensor, x_hat: Tensor
                            ) -> tuple[Tensor, dict[str, Tensor]]:
        """(the loss to minimise, the terms to log) of the reconstruction x_hat of `target`: its FVU."""
        loss = sae.fvu(target, x_hat)
        return loss, {"fvu": loss.detach()}

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        cfg = self.cfg
        x_in, target = self.split(x)
        xc = sae.comm.shard_input(self.encoder_input(sae, x_in))
        cand, ids, aux, aux_ids, total_dead = encode_with_aux(sae, xc, cfg.k, dead_mask)
        vals, idx = sae.comm.select_topk(cand, ids, cfg.k)
        vals = F.relu(vals)  # (B, k)
        x_hat = self.decode(sae, x, vals, idx)
        loss, terms = self.reconstruction_loss(sae, x, target, x_hat)
        if total_dead is not None:
            aux_loss = auxk_loss(sae, target, x_hat, aux, aux_ids, total_dead)
            loss = loss + cfg.aux_coef * aux_loss
            terms["auxk"] = aux_loss.detach()
        terms["l0"] = sae.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=x_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, vals, idx),
                         kth=self.kth(sae, vals) if dead_mask is not None and cfg.revive_after else None)

    @staticmethod
    def kth(sae: SparseAutoencoder, vals: Tensor) -> Tensor:
        """(B,) each token's smallest positive selected activation over every shard (0 where it has none):
        a shard holds the values of the selected latents it owns and zeros for the others'."""
        inf = vals.new_tensor(float("inf"))
        low = sae.comm.min_over_shards(torch.where(vals > 0, vals.detach(), inf).amin(dim=1))
        return torch.where(low.isinf(), torch.zeros_like(low), low)

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        xc = sae.comm.shard_input(self.encoder_input(sae, self.split(x)[0]))
        vals, idx, _, _ = kernels.topk_encode(xc, sae.W_enc, sae.b_enc, self.cfg.k, sae.encoder_chunk)
        vals, idx = sae.comm.select_topk(vals, idx, self.cfg.k)
        return F.relu(vals), idx

    def export_fields(self) -> dict:
        return {"k": self.cfg.k}

    @classmethod
    def config_from_export(cls, cfg: dict) -> dict:
        return {"k": cfg["k"]}
