"""The SAE spliced into the LM forward pass, and what it costs the model's output (docs/eval.md).

Splicing replaces the hook module's output at every non-special token by the SAE reconstruction;
special tokens (BOS/CLS/SEP) keep their clean value, as the SAE never saw them in training
(docs/design.md §2). The ablation baseline zeroes the output at every position, as SAEBench's does.

- causal LMs: LM loss recovered (SAEBench's ce_loss_score) = (CE_zero - CE_sae) / (CE_zero - CE_clean),
  next-token CE at the positions whose input token is not special; the KL-divergence score likewise.
- encoders without an LM head: embedding recovered = 1 - D(sae) / D(zero), where D is the mean
  cosine distance between the spliced and the clean mean-pooled output embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.metrics import HeldoutMeter
from sae_dist.sae import SparseAutoencoder

if TYPE_CHECKING:
    from sae_dist.features.replace import SiteSplice

HiddenFn = Callable[[Tensor], Tensor]


@contextmanager
def replace_output(module: nn.Module, fn: HiddenFn, keep: Tensor | None = None) -> Iterator[None]:
    """While active, `module`'s output h (B, T, d) becomes fn(h[keep]) at the `keep` positions."""

    def hook(_mod: nn.Module, _inp: object, out: object) -> object:
        h = out[0] if isinstance(out, tuple) else out
        assert isinstance(h, Tensor)
        if keep is None or keep.shape != h.shape[:2]:  # generation steps: every new token
            new = fn(h.reshape(-1, h.shape[-1])).reshape(h.shape).to(h.dtype)
        else:
            new = h.clone()
            new[keep] = fn(h[keep]).to(h.dtype)
        return (new, *out[1:]) if isinstance(out, tuple) else new

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_reconstruction(sae: SparseAutoencoder, meter: HeldoutMeter | None = None) -> HiddenFn:
    """x -> x^ of the (exported, raw-activation) SAE; feeds x, the codes and x^ to `meter` (the
    held-out metrics, computed on the very tensors spliced in)."""

    def fn(x: Tensor) -> Tensor:
        x = x.float()
        vals, idx = sae.encode_sparse(x)  # (N, k)
        x_hat = sae.decode_sparse(vals, idx)
        if meter is not None:
            meter.add(x, vals, idx, x_hat)
        return x_hat

    return fn


def zero_ablation(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _next_token_ce(model: nn.Module, ids: Tensor, keep: Tensor, ref: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy summed over the positions whose input token is kept (scalar, float64),
    and with `ref` (the clean pass's log-probabilities) KL(clean || this pass) summed over the kept
    positions (scalar, float64); without it, this pass's log-probabilities (B, T, V)."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()  # (B, T, V)
    ce = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")  # (B, T-1)
    ce = ce[keep[:, :-1]].double().sum()
    logp = logits.log_softmax(-1)
    del logits
    if ref is None:
        return ce, logp
    return ce, (ref.exp() * (ref - logp)).sum(-1)[keep].double().sum()


def _pooled_embedding(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean-pooled last hidden state (B, d): the sentence embedding all-MiniLM-L6-v2 is trained for."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1).double()


class SpliceMeter:
    """Accumulates clean / SAE-spliced / zero-ablated outputs over batches of contexts."""

    def __init__(self, model: nn.Module, module: nn.Module | None, sae: SparseAutoencoder, causal: bool,
                 heldout: HeldoutMeter | None = None, sites: SiteSplice | None = None) -> None:
        """`module`: the hook module an SAE replaces; or `sites`: a multi-site dictionary's splice."""
        self.model, self.module, self.sae, self.causal, self.heldout = model, module, sae, causal, heldout
        self.sites = sites
        self.sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mse_sae": 0.0, "mse_zero": 0.0, "kl_sae": 0.0,
                     "kl_zero": 0.0}
        self.count = self.kl_count = self.positions = self.batches = 0

    @torch.no_grad()
    def add(self, ids: Tensor, keep: Tensor) -> None:
        """One batch of contexts (C, T) and its non-special mask. The SAE replaces the kept positions;
        the ablation zeroes every position (as SAEBench's does); the loss and the KL divergences are
        averaged over the positions whose input token is kept."""
        s = self.sums
        self.batches += 1
        self.positions += ids.numel()
        if self.causal:
            ce, ref = _next_token_ce(self.model, ids, keep)
            s["clean"] += float(ce)
            for name in ("sae", "zero"):
                with self._spliced(name, keep):
                    ce, kl = _next_token_ce(self.model, ids, keep, ref)
                s[name] += float(ce)
                s[f"kl_{name}"] += float(kl)
            self.count += int(keep[:, :-1].sum())
            self.kl_count += int(keep.sum())
            return
        clean = _pooled_embedding(self.model, ids)
        with self._spliced("sae", keep):
            spliced = _pooled_embedding(self.model, ids)
        with self._spliced("zero", keep):
            ablated = _pooled_embedding(self.model, ids)
        s["sae"] += float((1 - F.cosine_similarity(spliced, clean, dim=1)).sum())
        s["zero"] += float((1 - F.cosine_similarity(ablated, clean, dim=1)).sum())
        s["mse_sae"] += float((spliced - clean).pow(2).sum())
        s["mse_zero"] += float((ablated - clean).pow(2).sum())
        self.count += ids.shape[0]

    def _spliced(self, name: str, keep: Tensor) -> AbstractContextManager[None]:
        """The dictionary's reconstruction at the kept positions ("sae"), or zeros everywhere ("zero")."""
        if self.sites is not None:
            return self.sites.active(keep, zero=name == "zero")
        assert self.module is not None
        if name == "zero":
            return replace_output(self.module, zero_ablation)
        return replace_output(self.module, sae_reconstruction(self.sae, self.heldout), keep)

    def result(self) -> dict[str, float]:
        s, n = self.sums, max(self.count, 1)
        if self.causal:
            gap, p = s["zero"] - s["clean"], max(self.kl_count, 1)
            return {
                "ce_clean": s["clean"] / n,
                "ce_sae": s["sae"] / n,
                "ce_zero_ablate": s["zero"] / n,
                "lm_loss_recovered": (s["zero"] - s["sae"]) / gap if gap else float("nan"),
                "kl_div_with_sae": s["kl_sae"] / p,
                "kl_div_with_ablation": s["kl_zero"] / p,
                "kl_div_score": (s["kl_zero"] - s["kl_sae"]) / s["kl_zero"] if s["kl_zero"] else float("nan"),
            }
        return {
            "embedding_cos_distance_sae": s["sae"] / n,
            "embedding_cos_distance_zero_ablate": s["zero"] / n,
            "embedding_recovered": 1 - s["sae"] / s["zero"] if s["zero"] else float("nan"),
            "embedding_mse_recovered": 1 - s["mse_sae"] / s["mse_zero"] if s["mse_zero"] else float("nan"),
        }
