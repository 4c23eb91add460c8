"""Cross-layer transcoder (CLT, Anthropic's Circuit Tracing 2025) over L layers, TopK per layer.

A batch is (B, 2L, d): model.sites lists the L MLP inputs in layer order, then the L MLP outputs. A
latent belongs to one layer l (latent i: layer i mod L, so every feature shard holds the same number
of each layer's latents); it reads that layer's MLP input and writes into the MLP outputs of layers
l..L-1:

    f_l  = TopK_k(relu(x_in_l W_enc_l^T + b_enc_l))                 the k latents of layer l per token
    y^_m = sum_{l <= m} f_l W_dec_{l->m} + b_dec_m
    loss = sum_m FVU(y_m, y^_m)

W_dec is (n, L d): a latent's L blocks, of which those of the layers before its own are zero and stay
zero. Viewed as an (n L, d) table, row j L + m is latent j's block for layer m, and the decode of a
token is L bags of rows: bag m sums the token's active latents of layers <= m at their rows for layer
m (one `kernels.triangle_decode`, a bag decode into (B L, d) = (B, L d)). Only the blocks on or after each latent's layer
are ever read, so the decode and its backward do (L + 1) / (2 L) of a dense (n, L d) decode's work
(58% at L = 6), no B x n x L buffer exists, and the zero blocks get no gradient at all. Under feature
parallelism the L per-layer selections go as one (L B, k) batch of rows through one all-gather, and
the partial decodes into all layers as one all-reduce: two collectives per step for any L.
AuxK works per layer: each layer's k_aux best dead latents (one more stacked selection) decode the
residual of every output, as TopK's do the residual of its one; that decode and the reconstruction's
are one triangle decode and one all-reduce (a single decoder-sized gradient in the backward). Not yet: a
global BatchTopK over layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sae_dist import kernels
from sae_dist.archs import register
from sae_dist.archs.base import Arch, SaeConfig, SaeOutput, fired_from_sparse
from sae_dist.errors import require

if TYPE_CHECKING:
    from sae_dist.config import Config
    from sae_dist.sae import SparseAutoencoder


@dataclass
class CLTConfig(SaeConfig):
    """sae.k is per layer: a token has up to L k active latents. sae.n_latents counts all layers'."""

    arch: str = "clt"
    k_aux: int = 0
    """AuxK per layer: the dead latents of each layer that model the residual of every output; 0 means
    d_model // (2 L), so that all layers together use TopK's d_model // 2 (Gao et al.)."""
    aux_coef: float = 1.0 / 32
    """Weight of the AuxK loss (0 turns it off)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        require(self.k_aux >= 0, f"sae.k_aux ({self.k_aux}) must be >= 0 (0 = d_model // (2 L))")
        require(self.aux_coef >= 0, f"sae.aux_coef ({self.aux_coef}) must be >= 0 (0 turns AuxK off)")


def _layers(x: Tensor) -> int:
    return x.shape[1] // 2


def valid_blocks(n_local: int, layers: int, device: torch.device | str = "cpu") -> Tensor:
    """(n_local, L) bool: latent j (layer j mod L) writes into layer m iff m >= its layer."""
    own = torch.arange(n_local, device=device) % layers
    return torch.arange(layers, device=device).unsqueeze(0) >= own.unsqueeze(1)


@register
class CrossLayerTranscoder(Arch):
    name = "clt"
    config = CLTConfig
    saelens_architecture = "topk"  # per layer; cfg.json adds the layers and the output width (export_fields)
    sites = 0
    uses_dead_mask = True

    @classmethod
    def width(cls, d_model: int, n_sites: int) -> int:
        return d_model

    @classmethod
    def out_width(cls, d_model: int, n_sites: int) -> int:
        return d_model * max(n_sites // 2, 1)

    @classmethod
    def check(cls, cfg: Config) -> None:
        super().check(cfg)
        require(
            cfg.trainer.optimizer != "muon",
            "trainer.optimizer=muon orthogonalises the CLT's (n, L d) decoder update as one matrix, which "
            "writes into the blocks of the layers before each latent's own (held at zero); use "
            "trainer.optimizer=adam or signum_sf with sae.arch=clt",
        )
        sites = cls._configured_sites(cfg)
        if sites is not None:
            require(
                sites % 2 == 0,
                f"sae.arch=clt reads L MLP inputs then L MLP outputs, but the data has {sites} sites (odd); "
                "list each layer's input and output in model.sites",
            )
            L = sites // 2
            require(
                cfg.sae.n_latents % (L * cfg.parallel.fp) == 0,
                f"sae.n_latents ({cfg.sae.n_latents}) must split evenly over {L} layers and parallel.fp "
                f"({cfg.parallel.fp}) feature shards; use a multiple of {L * cfg.parallel.fp}",
            )

    @staticmethod
    def _configured_sites(cfg: Config) -> int | None:
        """Sites per token as the config states them (model.sites, data.synthetic_sites); None for an
        activation cache, whose index says (check_sites reads it there)."""
        if cfg.data.source == "lm":
            return len(cfg.model.sites)
        return cfg.data.synthetic_sites if cfg.data.source == "synthetic" else None

    @classmethod
    def firings_per_token(cls, cfg: Config) -> int:
        """k per layer over L layers; from an activation cache (L not in the config) k alone: a longer
        window, never a shorter one."""
        sites = cls._configured_sites(cfg)
        return cfg.sae.k * max(sites // 2, 1) if sites is not None else cfg.sae.k

    @classmethod
    def check_source(cls, cfg: Config, source: Any) -> None:
        """Live LM data: the forward pass must reach input 0, output 0, input 1, output 1, ... (the sites
        listed as the L inputs in layer order, then the L outputs)."""
        reached = getattr(getattr(source, "hooked", None), "reached", None)
        if not reached or not cfg.model.sites:
            return
        L = len(cfg.model.sites) // 2
        want = [i for layer in range(L) for i in (layer, L + layer)]
        require(
            reached == want,
            f"sae.arch=clt needs model.sites as the {L} MLP inputs in layer order, then the {L} MLP outputs "
            f"in the same order, but the model reaches them as {[cfg.model.sites[i] for i in reached]}; "
            "reorder model.sites",
        )

    @classmethod
    def splice_targets(cls, n_sites: int) -> list[tuple[int, int]]:
        L = n_sites // 2
        return [(L + m, m) for m in range(L)]  # every layer's MLP output

    def split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        L = _layers(x)
        return x[:, :L], x[:, L:].reshape(x.shape[0], -1)

    def add_parameters(self, sae: SparseAutoencoder, n_local: int) -> None:
        """The decoder blocks before each latent's own layer start (and stay) at zero; rows renormalised."""
        L = sae.d_out // sae.d_model
        require(n_local % L == 0, f"a feature shard's {n_local} latents do not split evenly over {L} layers")
        with torch.no_grad():
            W = sae.W_dec.view(n_local, L, -1)
            W.mul_(valid_blocks(n_local, L).unsqueeze(2).to(W.dtype))
            sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    def _k_aux(self, sae: SparseAutoencoder, L: int) -> int:
        return min(self.cfg.k_aux or max(sae.d_model // (2 * L), 1), sae.n_local // L)

    def _select(self, sae: SparseAutoencoder, x_in: Tensor, dead_mask: Tensor | None = None
                ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor] | None]:
        """Per layer, the k largest pre-activations of its latents on every shard: (B, L k) values
        (before the ReLU) and local ids; with `dead_mask`, also each layer's k_aux best dead latents on
        this shard, as (L B, k_aux) rows of candidates and local ids (-inf where a layer has fewer).
        The L selections travel as one batch of L B rows."""
        B, L, _ = x_in.shape
        k = self.cfg.k
        n_per = sae.n_local // L
        W = sae.W_enc.view(n_per, L, -1)
        b = sae.b_enc.view(n_per, L)
        dead = dead_mask.view(n_per, L) if dead_mask is not None else None
        k_aux = self._k_aux(sae, L)
        xs = sae.comm.shard_input(x_in)
        cand, ids, aux, aux_ids = [], [], [], []
        for layer in range(L):
            v, i, a, ai = kernels.topk_encode(xs[:, layer], W[:, layer], b[:, layer], min(k, n_per), sae.encoder_chunk,
                                              dead[:, layer] if dead is not None else None, k_aux)
            cand.append(v)
            ids.append(i * L + layer)  # the layer's own index -> the shard's local id
            if dead is not None:
                aux.append(a)
                aux_ids.append(ai * L + layer)
        vals, idx = sae.comm.select_topk(torch.cat(cand), torch.cat(ids), k)  # (L B, k)
        return (vals.view(L, B, k).transpose(0, 1).reshape(B, L * k),
                idx.view(L, B, k).transpose(0, 1).reshape(B, L * k),
                (torch.cat(aux), torch.cat(aux_ids)) if dead is not None else None)

    def encode_sparse(self, sae: SparseAutoencoder, x: Tensor) -> tuple[Tensor, Tensor]:
        vals, idx, _ = self._select(sae, self.split(x)[0])
        return F.relu(vals), idx

    def _triangle(self, sae: SparseAutoencoder, pairs: list[tuple[Tensor, Tensor]]) -> Tensor:
        """The partial decodes (this shard's latents, before the all-reduce) of (B, w) selections (values,
        local ids), as one triangle decode: -> (sum of B, L d). Bag (b, m) holds token b's latents of
        layers <= m, latent j at row j L + m of W_dec viewed as (n L, d); the selections are padded with
        zeros to one width, and entries at zero (a ReLU's zeros: most of AuxK's dead candidates, and the
        padding) add nothing and pass no gradient, so they are skipped: the backward's cost is per entry."""
        L = sae.d_out // sae.d_model
        width = max(v.shape[1] for v, _ in pairs)
        vals = torch.cat([F.pad(v, (0, width - v.shape[1])) for v, _ in pairs])
        ids = torch.cat([F.pad(i, (0, width - i.shape[1])) for _, i in pairs])
        return kernels.triangle_decode(vals, ids, sae.W_dec, L)

    def _decode_partial(self, sae: SparseAutoencoder, vals: Tensor, idx: Tensor) -> Tensor:
        return sae.comm.sum_partial(self._triangle(sae, [(vals, idx)]))

    def decode(self, sae: SparseAutoencoder, x: Tensor, vals: Tensor, idx: Tensor) -> Tensor:
        return self._decode_partial(sae, vals, idx) + sae.b_dec  # (B, L d)

    def _aux_select(self, sae: SparseAutoencoder, aux: Tensor, aux_ids: Tensor, B: int, L: int
                    ) -> tuple[Tensor, Tensor]:
        """Each layer's k_aux best dead latents over every shard, per token: (B, L k_aux) values after
        the ReLU and local ids (AuxK, per layer)."""
        aux = aux.masked_fill(~aux.isfinite(), 0.0)
        width = min(self._k_aux(sae, L), aux.shape[1] * sae.comm.n_shards)
        a_vals, a_idx = sae.comm.select_topk(aux, aux_ids, width)  # (L B, width)
        a_vals = a_vals.view(L, B, width).transpose(0, 1).reshape(B, L * width)
        return F.relu(a_vals), a_idx.view(L, B, width).transpose(0, 1).reshape(B, L * width)

    def _decode_both(self, sae: SparseAutoencoder, vals: Tensor, idx: Tensor, a_vals: Tensor, a_idx: Tensor
                     ) -> tuple[Tensor, Tensor]:
        """The reconstruction's and AuxK's decodes as one triangle decode and one all-reduce, so that the
        backward forms one (n, L d) decoder gradient, not one per decode."""
        B = vals.shape[0]
        both = sae.comm.sum_partial(self._triangle(sae, [(vals, idx), (a_vals, a_idx)]))
        return both[:B] + sae.b_dec, both[B:]

    def forward(self, sae: SparseAutoencoder, x: Tensor, dead_mask: Tensor | None) -> SaeOutput:
        B = x.shape[0]
        L = _layers(x)
        x_in, y = self.split(x)
        total_dead = sae.comm.sum_scalar(dead_mask.sum().float()) if dead_mask is not None else None
        use_aux = total_dead is not None and bool(total_dead > 0) and self.cfg.aux_coef > 0
        pre, idx, aux = self._select(sae, x_in, dead_mask if use_aux else None)
        vals = F.relu(pre)
        if aux is not None and total_dead is not None:
            y_hat, e_hat = self._decode_both(sae, vals, idx, *self._aux_select(sae, *aux, B, L))
        else:
            y_hat, e_hat = self.decode(sae, x, vals, idx), None
        per_layer = sae.fvu_sites(y.view(B, L, -1), y_hat.view(B, L, -1))
        loss = per_layer.sum()
        terms = {"fvu": per_layer.mean().detach()} | {f"fvu_layer{m}": v for m, v in enumerate(per_layer.detach())}
        if e_hat is not None and total_dead is not None:
            # FVU of the residual of every output (no gradient into the reconstruction), scaled down
            # while fewer than L k_aux latents are dead (TopK's AuxK, per layer)
            aux_loss = sae.fvu((y - y_hat).detach(), e_hat).nan_to_num(0.0)
            aux_loss = aux_loss * min(1.0, float(total_dead) / (L * self._k_aux(sae, L)))
            loss = loss + self.cfg.aux_coef * aux_loss
            terms["auxk"] = aux_loss.detach()
        terms["l0"] = sae.comm.sum_scalar((vals > 0).sum(dim=1).float().mean())
        return SaeOutput(x_hat=y_hat, loss=loss, terms=terms, fired=fired_from_sparse(sae.n_local, vals, idx))

    def export_fields(self) -> dict:
        return {"k": self.cfg.k, "apply_b_dec_to_input": False}

    @classmethod
    def config_from_export(cls, cfg: dict) -> dict:
        return {"k": cfg["k"]}
