"""The held-out set: one definition behind every figure an SAE is scored with (docs/eval.md).

The held-out set of a run is the first `tokens` (trainer.eval_tokens) non-special tokens of the packed
contexts of the held-out documents (data.heldout_fraction of data.corpus, chosen by a hash of each
document's text), read `batch_contexts` (model.batch_contexts) contexts per LM forward pass at the run's
LM precision. Special tokens (CLS/SEP/BOS/EOS/PAD) never reach the SAE, in training or evaluation.

The end-of-training evaluation and `sae-dist eval` both read it from this record, which the export
carries in cfg.json (`sae_dist_heldout`), so one SAE has one set of held-out figures whichever command
prints them. The LM's batch and precision are part of the definition because activations differ in
their last bits with either.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

from sae_dist.config import Config

KEY = "sae_dist_heldout"
"""Where an export's cfg.json records its held-out set."""

DEFAULTS: dict[str, Any] = {
    "source": "lm", "corpus": "python-docs", "heldout_fraction": 0.02, "text_field": "text", "context_size": 128,
    "batch_contexts": 64, "tokens": 65536, "lm_dtype": "float32", "special_tokens": "excluded",
}


def heldout_spec(cfg: Config) -> dict[str, Any]:
    """The held-out set of a run, as JSON."""
    spec = {
        "source": cfg.data.source, "corpus": cfg.data.corpus, "heldout_fraction": cfg.data.heldout_fraction,
        "text_field": cfg.data.text_field, "context_size": cfg.model.context_size,
        "batch_contexts": cfg.model.batch_contexts, "tokens": cfg.trainer.eval_tokens, "special_tokens": "excluded",
    }
    if cfg.data.source == "lm":
        from sae_dist.data.lm import lm_dtype

        spec["lm_dtype"] = str(lm_dtype(cfg.model)).removeprefix("torch.")
    elif cfg.data.source == "cache":
        spec["cache_dir"] = cfg.data.cache_dir.rstrip("/") + "/heldout"
    return spec


def covering(batches: Iterable[Tensor], tokens: int) -> Iterator[Tensor]:
    """Whole batches, in order, until they hold `tokens` rows (all of them if there are fewer). The
    metrics count only the first `tokens` rows, but encode the last batch whole (sae_dist.metrics)."""
    have = 0
    for x in batches:
        if have >= tokens:
            return
        have += x.shape[0]
        yield x
