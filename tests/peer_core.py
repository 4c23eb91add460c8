"""Runs in the peer venv (scripts/peer_venv.sh), not in ours: SAELens's and SAEBench's own core-metric
functions on a saved HF causal LM, an SAE export and token batches that tests/test_peer_metrics.py
gives it. Prints one JSON object: {"versions": ..., "saelens": {...}, "saebench": {...}}.

    <peer python> tests/peer_core.py <job.json>

job.json: export_dir, model_dir, hook (module path), tokens (a .safetensors file with `tokens`
(batches * contexts, T)), batch_contexts, ignore (special token ids).

The peers call TransformerLens's model interface; `HFModel` answers those calls with the real HF model
and a forward hook on the named module (run_with_cache returns its output; run_with_hooks replaces it
with the hook's return value and runs the rest of the model). Every metric is the peer's own code.
"""

from __future__ import annotations

import json
import os
import sys
from types import SimpleNamespace

os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file  # noqa: E402


class HFModel:
    def __init__(self, model, hook: str) -> None:
        self.model, self.hook = model, hook
        self.module = dict(model.named_modules())[hook]

    def _run(self, tokens, fn=None):
        captured = {}

        def hook(_mod, _inp, out):
            h = out[0] if isinstance(out, tuple) else out
            captured["act"] = h
            if fn is None:
                return None
            new = fn(h.clone(), hook=SimpleNamespace(name=self.hook))
            return (new, *out[1:]) if isinstance(out, tuple) else new

        handle = self.module.register_forward_hook(hook)
        try:
            logits = self.model(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits.float()
        finally:
            handle.remove()
        return logits, captured["act"]

    @staticmethod
    def _out(logits, tokens, return_type, loss_per_token):
        loss = F.cross_entropy(logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none")  # (B, T-1)
        loss = loss if loss_per_token else loss.mean()
        return {"both": (logits, loss), "loss": loss}.get(return_type, logits)

    def __call__(self, tokens, return_type="logits", loss_per_token=False, **_):
        return self._out(self._run(tokens)[0], tokens, return_type, loss_per_token)

    def run_with_hooks(self, tokens, return_type="logits", fwd_hooks=(), loss_per_token=False, **_):
        ((name, fn),) = fwd_hooks
        assert name == self.hook, name
        return self._out(self._run(tokens, fn)[0], tokens, return_type, loss_per_token)

    def run_with_cache(self, tokens, names_filter=None, **_):
        return None, {self.hook: self._run(tokens)[1]}


class Store:
    """The token batches, in order, as an ActivationsStore hands them out."""

    def __init__(self, batches, context_size: int) -> None:
        self.batches, self.i = batches, 0
        self.context_size, self.store_batch_size_prompts = context_size, batches[0].shape[0]

    def get_batch_tokens(self, n):
        b = self.batches[self.i % len(self.batches)]
        assert b.shape[0] == n, (b.shape, n)
        self.i += 1
        return b

    def reset_input_dataset(self):
        self.i = 0


def flat(nested):
    return {k: v for group in nested.values() for k, v in group.items()}


def main() -> None:
    with open(sys.argv[1]) as fh:
        job = json.load(fh)
    import sae_lens
    from sae_lens import SAE
    from sae_lens import evals as sl
    from sae_lens.training.activation_scaler import ActivationScaler
    from transformers import AutoModelForCausalLM

    torch.set_grad_enabled(False)
    model = HFModel(AutoModelForCausalLM.from_pretrained(job["model_dir"]).eval(), job["hook"])
    tokens = load_file(job["tokens"])["tokens"]
    c = job["batch_contexts"]
    batches = [tokens[i : i + c] for i in range(0, len(tokens), c)]
    store = Store(batches, tokens.shape[1])
    sae = SAE.load_from_disk(job["export_dir"], device="cpu")
    out = {"versions": {"sae_lens": sae_lens.__version__, "torch": torch.__version__}}

    config = sl.get_eval_everything_config(batch_size_prompts=c, n_eval_reconstruction_batches=len(batches),
                                           n_eval_sparsity_variance_batches=len(batches))
    metrics, _ = sl.run_evals(sae, store, model, ActivationScaler(), config, exclude_special_tokens=job["ignore"])
    out["saelens"] = flat(metrics)
    try:
        import importlib.metadata

        import sae_bench.evals.core.main as core
        from sae_bench.evals.core.eval_config import CoreEvalConfig
        from sae_bench.sae_bench_utils import general_utils
    except ImportError as err:
        out["saebench_missing"] = str(err)
    else:
        out["versions"]["sae_bench"] = importlib.metadata.version("sae-bench")
        general_utils._standardize_sae_cfg(sae.cfg)  # the hook_layer/architecture_str fields SAEBench reads
        config = CoreEvalConfig(model_name="tiny", batch_size_prompts=c, n_eval_reconstruction_batches=len(batches),
                                n_eval_sparsity_variance_batches=len(batches), dataset="tokens", context_size=tokens.shape[1],
                                compute_kl=True, compute_ce_loss=True, compute_l2_norms=True,
                                compute_sparsity_metrics=True, compute_variance_metrics=True,
                                compute_featurewise_density_statistics=True,
                                compute_featurewise_weight_based_metrics=True,
                                exclude_special_tokens_from_reconstruction=True)
        store.reset_input_dataset()
        metrics, features = core.run_evals(sae, store, model, config, ignore_tokens=set(job["ignore"]))
        out["saebench"] = flat(metrics) | core.calculate_misc_metrics(features)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
