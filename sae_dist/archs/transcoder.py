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
from torch import Tensor, nn

from sae_dist.archs import register
from sae_dist.archs.base import Arch
from sae_dist.archs.topk import TopK, TopKConfig

if TYPE_CHECKING:
    from sae_dist.sae import SparseAutoencoder


@dataclass
class TranscoderConfig(TopKConfig):
    arch: str = "transcoder"
    aux_coef: float = 1.0 / 8
    """AuxK at 4x TopK's weight, for both transcoders. On the default job's data (n = 6144, batch 1024,
    revival off, 2026-12-03): transcoder 0.1198 / 29.74% dead at 1/8, 0.1204 / 25.90% at 1/2;
    skip-transcoder 0.0884 / 36.56% at 1/8, 0.0895 / 42.97% at 1/32 (docs/training.md, "Revival and the
    dictionaries across sites"; the transcoder's earlier sweep is in the README)."""
    revive_after: float = 0.0
    """Revival is off for the transcoders (TopKConfig.revive_after has what it does). On the default job's
    data (n = 6144, batch 1024, the cached layer-3 MLP; docs/training.md, "Revival and the dictionaries
    across sites") it left more latents dead, not fewer: transcoder FVU 0.1300 / 54.90% dead with it
    against 0.1198 / 29.74% without (a cap of 0.25: 0.1237 / 35.14%), skip-transcoder 0.0941 / 59.08%
    against 0.0895 / 42.97%. sae.revive_after=16 turns it on."""


@dataclass
class SkipTranscoderConfig(TranscoderConfig):
    arch: str = "skip_transcoder"


@register
class Transcoder(TopK):
    name = "transcoder"
    config = TranscoderConfig
    saelens_architecture = "transcoder"
    """SAELens's transcoder layout: W_enc (d_in, n), W_dec (n, d_out), b_dec (d_out,), W_skip (d_out, d_in),
    cfg.json with d_out and hook_name_out. SAELens's transcoders apply a ReLU to every latent; ours keep the
    top k (cfg.json's k), so its encode matches ours after that top-k (docs/extending.md)."""
    sites = 2

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[:, 0], x[:, 1]

    def encoder_input(self, sae: SparseAutoencoder, x_in: Tensor) -> Tensor:
        return x_in  # b_dec lives in the output space

    def init_from_batch(self, sae: SparseAutoencoder, x: Tensor) -> None:
        """b_enc starts at -mean(x_in) W_enc^T (the first batch's input mean over every data replica), so
        the encoder starts on the centred input, as an SAE's does through x - b_dec. An MLP's input has a
        large mean (MiniLM layer 3: norm 7.1 against 10.9 RMS about it): uncentred, a random latent's
        pre-activation is mostly that mean's projection, and the half of the latents that point away
        from it start, and mostly stay, dead. Then TopK's scale, which multiplies b_enc with W_enc."""
        mean = sae.comm.mean_over_data(self.split(x)[0].mean(dim=0))
        for s in range(0, sae.W_enc.shape[0], 65536):  # bf16 weights: products in the input's dtype, a block at a time
            sae.b_enc[s:s + 65536] = -(sae.W_enc[s:s + 65536].to(mean.dtype) @ mean)
        s = self._first_scale(sae, x)
        sae.W_enc.mul_(s)
        sae.b_enc.mul_(s)

    @classmethod
    def splice_targets(cls, n_sites: int) -> list[tuple[int, int]]:
        return [(1, 0)]  # the MLP's output

    def decode(self, sae: SparseAutoencoder, x: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        return sae.decode_sparse(vals, idx) + self.skip(sae, x)

    def export_fields(self) -> dict:
        return {"k": self.cfg.k, "apply_b_dec_to_input": False, "sae_dist_sites": 2}


@register
class SkipTranscoder(Transcoder):
    name = "skip_transcoder"
    config = SkipTranscoderConfig
    saelens_architecture = "skip_transcoder"
    replicated = ("W_skip",)
    export_replicated = ("W_skip",)

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        sae.W_skip = nn.Parameter(torch.zeros(sae.d_model, sae.d_model))

    def skip(self, sae: SparseAutoencoder, x: Tensor) -> Tensor:
        x_in = self.split(x)[0]
        return x_in @ sae.W_skip.t().to(x_in.dtype)  # bf16 weights (trainer.param_dtype): the input's dtype

    def export_shapes(self, d_model: int) -> dict[str, tuple[int, ...]]:
        return {"W_skip": (d_model, d_model)}

    def export_tensors(self, sae: SparseAutoencoder) -> dict[str, Tensor]:
        return {"W_skip": sae.W_skip.detach()}  # y = x_in W_skip^T on raw activations too: no scale to fold

    def load_exported(self, sae: SparseAutoencoder, tensors: dict[str, Tensor]) -> None:
        sae.W_skip.copy_(tensors["W_skip"])


__all__ = ["Arch", "SkipTranscoder", "Transcoder"]
