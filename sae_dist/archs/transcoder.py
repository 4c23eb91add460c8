"""Transcoders: a sparse dictionary from an MLP's input to its output (Dunefsky et al. 2024), TopK with
AuxK, and the skip-transcoder, which adds a learned linear map from input to output (Paulo et al. 2025).

A batch is (B, 2, d): model.sites gives the MLP's input, then its output.

    f     = TopK_k(relu(x_in W_enc^T + b_enc))
    y^    = f W_dec + b_dec  (+ x_in W_skip^T for the skip-transcoder)
    loss  = FVU(y, y^) + aux_coef * FVU(y - y^, TopK_kaux over dead latents decoded)

The encoder reads the input as it is (no b_dec subtracted: b_dec lives in the output space). The
rest is TopK's: the same streaming encoder and sparse decoder kernels, the same AuxK, the same
feature-parallel collectives (one selection, one sum of the partial decodes per step). W_skip is
replicated on every feature shard; it sees the summed decode, so its gradient is the same on all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist import kernels
from sae_dist.archs import register
from sae_dist.archs.base import Arch, SaeOutput, fired_from_sparse
from sae_dist.archs.topk import TopK, TopKConfig, auxk_loss, encode_with_aux

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class TranscoderConfig(TopKConfig):
    arch: str = "transcoder"


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    arch: str = "skip_transcoder"


@register
class Transcoder(TopK):
    name = "transcoder"
    config = TranscoderConfig
    saelens_architecture = "topk"  # its encoder and decoder; cfg.json adds the output site (export_fields)
    sites = 2

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, 0], x[:, 1]

    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """W_enc starts as the decoder's transpose, scaled by sae.encoder_scale or by the least-squares
        scale of the first batch's output reconstruction (as TopK's, with the output as the target)."""
        s = self.cfg.encoder_scale
        if not s:
            _, y = self.split(x)
            r = self.decode(sae, x, *self.encode_sparse(sae, x)) - sae.b_dec - self._skip(sae, x)
            yc = y - sae.b_dec - self._skip(sae, x)
            num = sae.comm.mean_over_data((yc * r).sum().double())
            den = sae.comm.mean_over_data(r.pow(2).sum().double())
            s = float(num / den) if float(den) > 0 and float(num) > 0 else 1.0
        sae.W_enc.mul_(s)

    def _skip(self, sae: SparseAutoencoder, x: Tensor) -> Tensor | float:
        return 0.0

    def decode(self, sae: SparseAutoencoder, x: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        return sae.decode_sparse(vals, idx) + self._skip(sae, x)

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        cfg = self.cfg
        x_in, y = self.split(x)
        cand, ids, aux, aux_ids, total_dead = encode_with_aux(sae, sae.comm.shard_input(x_in), cfg.k, dead_mask)
        vals, idx = sae.comm.select_topk(cand, ids, cfg.k)
        vals = F.relu(vals)
        y_hat = self.decode(sae, x, vals, idx)
        loss = sae.fvu(y, y_hat)
        terms = {"fvu": loss.detach()}
        if total_dead is not None:
            aux_loss = auxk_loss(sae, y, y_hat, aux, aux_ids, total_dead)
            loss = loss + cfg.aux_coef * aux_loss
            terms["auxk"] = aux_loss.detach()
        terms["l0"] = sae.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=y_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, vals, idx))

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        xc = sae.comm.shard_input(self.split(x)[0])
        vals, idx, _, _ = kernels.topk_encode(xc, sae.W_enc, sae.b_enc, self.cfg.k, sae.encoder_chunk)
        vals, idx = sae.comm.select_topk(vals, idx, self.cfg.k)
        return F.relu(vals), idx

    def export_fields(self) -> dict:
        return {"k": self.cfg.k, "apply_b_dec_to_input": False, "sae_dist_sites": 2}


@register
class SkipTranscoder(Transcoder):
    name = "skip_transcoder"
    config = SkipTranscoderConfig
    replicated = ("W_skip",)
    export_replicated = ("W_skip",)

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        sae.W_skip = nn.Parameter(torch.zeros(sae.d_model, sae.d_model))

    def _skip(self, sae: SparseAutoencoder, x: Tensor) -> Tensor:
        return self.split(x)[0] @ sae.W_skip.t()

    def export_shapes(self, d_model: int) -> dict[str, tuple[int, ...]]:
        return {"W_skip": (d_model, d_model)}

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        return {"W_skip": sae.W_skip.detach()}  # y = x_in W_skip^T on raw activations too: no scale to fold

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        sae.W_skip.copy_(tensors["W_skip"])


__all__ = ["Arch", "SkipTranscoder", "Transcoder"]
