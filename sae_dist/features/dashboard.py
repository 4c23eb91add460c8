"""`sae-dist dashboard build`: one streaming pass over text collects every selected feature's top
contexts, quantile samples, histogram and frequency (sae_dist.features.collect); the decoder gives the
nearest features and, for causal LMs, the output tokens each feature promotes and suppresses
(W_dec @ W_U, the logit lens); sae_dist.features.site writes the static site."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from sae_dist.data.lm import HookedModel
from sae_dist.features.collect import FeatureCollector, FeatureStats
from sae_dist.features.source import FeatureSetup

log = logging.getLogger(__name__)


@dataclass
class DecoderViews:
    neighbors: Tensor
    """(F, m) nearest latents by decoder cosine."""
    neighbor_cos: Tensor
    promoted: Tensor | None = None
    """(F, m) token ids with the largest W_dec @ W_U entries (causal LMs only)."""
    promoted_logit: Tensor | None = None
    suppressed: Tensor | None = None
    suppressed_logit: Tensor | None = None
    logit_hist: tuple[Tensor, Tensor] | None = None
    """(F, bins) counts and (F, bins) bin centres of each feature's logit-lens vector."""


@torch.no_grad()
def decoder_views(W_dec: Tensor, features: Tensor, W_U: Tensor | None, m: int = 10, chunk: int = 256) -> DecoderViews:
    """W_dec (n, d) raw decoder rows, W_U (vocab, d) unembedding or None."""
    unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    parts: dict[str, list[Tensor]] = {k: [] for k in ("nb", "nc", "p", "pl", "s", "sl", "hc", "hv")}
    for start in range(0, len(features), chunk):
        f = features[start : start + chunk]
        cos = unit[f] @ unit.t()  # (c, n)
        cos[torch.arange(len(f)), f] = float("-inf")
        top = cos.topk(min(m, cos.shape[1] - 1), dim=1)
        parts["nb"].append(top.indices)
        parts["nc"].append(top.values)
        if W_U is not None:
            logits = W_dec[f] @ W_U.t()  # (c, vocab)
            hi, lo = logits.topk(m, dim=1), logits.topk(m, dim=1, largest=False)
            for key, part in (("p", hi.indices), ("pl", hi.values), ("s", lo.indices), ("sl", lo.values)):
                parts[key].append(part)
            lo_v, hi_v = logits.min(1, keepdim=True).values, logits.max(1, keepdim=True).values
            width = (hi_v - lo_v).clamp_min(1e-12) / 40
            b = ((logits - lo_v) / width).long().clamp(0, 39)
            parts["hc"].append(torch.zeros(len(f), 40, dtype=torch.long).scatter_add_(1, b, torch.ones_like(b)))
            parts["hv"].append(lo_v + width * (torch.arange(40) + 0.5))
    views = DecoderViews(torch.cat(parts["nb"]), torch.cat(parts["nc"]))
    if W_U is not None:
        views.promoted, views.promoted_logit = torch.cat(parts["p"]), torch.cat(parts["pl"])
        views.suppressed, views.suppressed_logit = torch.cat(parts["s"]), torch.cat(parts["sl"])
        views.logit_hist = (torch.cat(parts["hc"]), torch.cat(parts["hv"]))
    return views


def _encoded_batches(setup: FeatureSetup, batch_contexts: int, split: str, corpus: str
                     ) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(context ids, kept positions (not special tokens), the kept tokens' top-k values and ids), batch by
    batch over the split."""
    sae = setup.sae.eval()
    hooked = HookedModel(setup.model, setup.hook_name)
    special = setup.special_ids()
    for ids in setup.context_batches(split, batch_contexts, corpus):
        keep = ~torch.isin(ids, special)
        vals, idx = sae.encode_sparse(hooked(ids, torch.ones_like(ids))[keep].float())  # of (N, d)
        yield ids, keep, vals, idx


@torch.no_grad()
def collect_features(setup: FeatureSetup, features: Tensor, tokens: int, batch_contexts: int = 32,
                     split: str = "train", corpus: str = "", top_k: int = 16, n_samples: int = 16,
                     seed: int = 0) -> FeatureStats:
    collector = FeatureCollector(setup.sae.n_local, features, int(setup.cfg.get("context_size", 128)), top_k,
                                 n_samples, seed)
    with tqdm(total=tokens, desc="dashboard pass", unit="tok", disable=None) as bar:
        for ids, keep, vals, idx in _encoded_batches(setup, batch_contexts, split, corpus):
            collector.update(ids, keep, vals, idx)
            bar.update(int(keep.sum()))
            if collector.tokens >= tokens:
                break
    if collector.tokens < tokens:
        log.warning("the %s split has only %d tokens (asked for %d)", split, collector.tokens, tokens)
    return collector.result()


@torch.no_grad()
def fired_latents(setup: FeatureSetup, n_features: int, tokens: int, batch_contexts: int = 32, split: str = "train",
                  corpus: str = "") -> Tensor:
    """The first `n_features` latent ids (in id order) that fire on the first `tokens` tokens of the split:
    in a dictionary whose first latents are mostly dead (a short run of a very large one), the first N
    ids would make pages that say "never fired". Fewer when fewer fire."""
    fired = torch.zeros(setup.sae.n_local, dtype=torch.bool)
    seen = 0
    for _, keep, vals, idx in _encoded_batches(setup, batch_contexts, split, corpus):
        fired[idx[vals > 0]] = True
        seen += int(keep.sum())
        if seen >= tokens:
            break
    return fired.nonzero().squeeze(1)[:n_features]


def build_dashboard(setup: FeatureSetup, out_dir: str, features: Tensor, tokens: int, batch_contexts: int = 32,
                    split: str = "train", corpus: str = "", top_k: int = 16, n_samples: int = 16,
                    seed: int = 0, neuronpedia: bool = False) -> dict[str, Any]:
    from sae_dist.features.site import write_site

    t0 = time.perf_counter()
    stats = collect_features(setup, features, tokens, batch_contexts, split, corpus, top_k, n_samples, seed)
    t_pass = time.perf_counter() - t0
    W_U = setup.model.get_output_embeddings().weight.detach().float() if setup.causal else None
    views = decoder_views(setup.sae.W_dec.detach().float(), stats.features, W_U)
    meta = {"model_name": setup.cfg["model_name"], "hook_name": setup.cfg["hook_name"], "d_sae": setup.sae.n_local,
            "d_in": setup.sae.d_model, "tokens": stats.tokens, "split": split, "causal": setup.causal,
            "corpus": corpus or setup.settings["corpus"]}
    write_site(out_dir, stats, views, setup.tokenizer, meta, setup.sae.W_dec.detach().float(), neuronpedia)
    total = time.perf_counter() - t0
    log.info("dashboards for %d features in %.1f s (pass %.1f s) -> %s", len(features), total, t_pass, out_dir)
    return meta | {"features": len(features), "seconds": total, "pass_seconds": t_pass, "out_dir": out_dir}
