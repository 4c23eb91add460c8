"""The SAE spliced into the LM forward pass, and what it costs the model's output (docs/eval.md).

Splicing replaces the hook module's output at every non-special token by a function of it: the SAE
reconstruction, or zeros (the ablation baseline). Special tokens (BOS/CLS/SEP) keep their clean value:
the SAE never saw them in training (docs/design.md §2).

- causal LMs: LM loss recovered = (CE_zero - CE_sae) / (CE_zero - CE_clean), next-token CE.
- encoders without an LM head: embedding recovered = 1 - D(sae) / D(zero), where D is the mean
  cosine distance between the spliced and the clean mean-pooled output embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sae_dist.sae import SparseAutoencoder

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


@contextmanager
def capture_output(module: nn.Module, into: list[Tensor]) -> Iterator[None]:
    """Appends the module's output (B, T, d) to `into` on every forward, changing nothing."""

    def hook(_mod: nn.Module, _inp: object, out: object) -> None:
        into.append(out[0] if isinstance(out, tuple) else out)  # type: ignore[arg-type,index]

    handle = module.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def sae_reconstruction(sae: SparseAutoencoder, fired: Tensor | None = None) -> HiddenFn:
    """x -> x^ of the (exported, raw-activation) SAE; counts firings per latent into `fired`."""

    def fn(x: Tensor) -> Tensor:
        vals, idx = sae.encode_sparse(x.float())  # (N, k)
        if fired is not None:
            active = vals > 0
            fired.index_add_(0, idx[active], torch.ones_like(idx[active]))
        return sae.decode_sparse(vals, idx)

    return fn


def zero_ablation(x: Tensor) -> Tensor:
    return torch.zeros_like(x)


def _next_token_ce(model: nn.Module, ids: Tensor) -> Tensor:
    """Summed next-token cross-entropy over the batch (scalar, float64)."""
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits  # (B, T, V)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum").double()


def _pooled_embedding(model: nn.Module, ids: Tensor) -> Tensor:
    """Mean-pooled last hidden state (B, d): the sentence embedding all-MiniLM-L6-v2 is trained for."""
    return model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state.mean(1).double()


class SpliceMeter:
    """Accumulates clean / SAE-spliced / zero-ablated outputs over batches of contexts."""

    def __init__(self, model: nn.Module, module: nn.Module, sae: SparseAutoencoder, causal: bool) -> None:
        self.model, self.module, self.sae, self.causal = model, module, sae, causal
        self.fired = torch.zeros(sae.n_local, dtype=torch.long)
        self.sums = {"clean": 0.0, "sae": 0.0, "zero": 0.0, "mse_sae": 0.0, "mse_zero": 0.0}
        self.count = 0

    @torch.no_grad()
    def add(self, ids: Tensor, keep: Tensor) -> Tensor:
        """One batch of contexts (C, T) and its non-special mask; returns the clean hook activations
        at the kept tokens (N, d), for the reconstruction metrics."""
        captured: list[Tensor] = []
        run = _next_token_ce if self.causal else _pooled_embedding
        with capture_output(self.module, captured):
            clean = run(self.model, ids)
        with replace_output(self.module, sae_reconstruction(self.sae, self.fired), keep):
            spliced = run(self.model, ids)
        with replace_output(self.module, zero_ablation, keep):
            ablated = run(self.model, ids)
        s = self.sums
        if self.causal:
            s["clean"] += float(clean)
            s["sae"] += float(spliced)
            s["zero"] += float(ablated)
            self.count += ids.shape[0] * (ids.shape[1] - 1)
        else:
            s["sae"] += float((1 - F.cosine_similarity(spliced, clean, dim=1)).sum())
            s["zero"] += float((1 - F.cosine_similarity(ablated, clean, dim=1)).sum())
            s["mse_sae"] += float((spliced - clean).pow(2).sum())
            s["mse_zero"] += float((ablated - clean).pow(2).sum())
            self.count += ids.shape[0]
        return captured[0][keep].float()

    def result(self) -> dict[str, float]:
        s, n = self.sums, max(self.count, 1)
        if self.causal:
            gap = s["zero"] - s["clean"]
            return {
                "ce_clean": s["clean"] / n,
                "ce_sae": s["sae"] / n,
                "ce_zero_ablate": s["zero"] / n,
                "lm_loss_recovered": (s["zero"] - s["sae"]) / gap if gap else float("nan"),
            }
        return {
            "embedding_cos_distance_sae": s["sae"] / n,
            "embedding_cos_distance_zero_ablate": s["zero"] / n,
            "embedding_recovered": 1 - s["sae"] / s["zero"] if s["zero"] else float("nan"),
            "embedding_mse_recovered": 1 - s["mse_sae"] / s["mse_zero"] if s["mse_zero"] else float("nan"),
        }
