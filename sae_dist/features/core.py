"""`eval/core.json`: SAEBench's core evaluation, in SAEBench's result layout (docs/eval.md gives each
formula and where it departs from SAEBench's code).

The token metrics come from the held-out pass (sae_dist.metrics.HeldoutMeter, the SAE spliced into the
LM); the weight metrics (the average over latents of the largest cosine similarity with any other
latent, for encoder and decoder directions) from sae_dist.metrics.weight_metrics.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

EVAL_TYPE_ID = "core"


def core_result(results: dict[str, Any], weights: dict[str, Any], settings: dict[str, Any],
                export_cfg: dict[str, Any], batches: int, positions: int) -> dict[str, Any]:
    """The SAEBench core result object (CoreEvalOutput's fields) for one SAE."""
    causal = "lm_loss_recovered" in results
    metrics: dict[str, dict[str, Any]] = {}
    if causal:
        metrics["model_behavior_preservation"] = {
            k: results[k] for k in ("kl_div_score", "kl_div_with_ablation", "kl_div_with_sae")}
        metrics["model_performance_preservation"] = {
            "ce_loss_score": results["lm_loss_recovered"], "ce_loss_with_ablation": results["ce_zero_ablate"],
            "ce_loss_with_sae": results["ce_sae"], "ce_loss_without_sae": results["ce_clean"]}
    metrics["reconstruction_quality"] = {
        k: results[k] for k in ("explained_variance", "explained_variance_legacy", "mse", "cossim")}
    metrics["shrinkage"] = {k: results[k] for k in ("l2_norm_in", "l2_norm_out", "l2_ratio",
                                                     "relative_reconstruction_bias")}
    metrics["sparsity"] = {"l0": results["l0"], "l1": results["l1"]}
    metrics["token_stats"] = {"total_tokens_eval_reconstruction": positions,
                              "total_tokens_eval_sparsity_variance": int(results["tokens"])}
    metrics["misc_metrics"] = {
        k: results[k] for k in ("freq_over_1_percent", "freq_over_10_percent", "normalized_freq_over_1_percent",
                                "normalized_freq_over_10_percent", "frac_alive")
    } | {k: weights[k] for k in ("average_max_encoder_cosine_sim", "average_max_decoder_cosine_sim")}
    unstructured: dict[str, Any] = {
        "computed_by": "sae-dist (docs/eval.md: formulas and differences from SAEBench's code)",
        "heldout": settings,
        "fvu": results["fvu"],
        "dead_fraction": results["dead_fraction"],
        "saebench_0_6_0": {  # SAEBench 0.6.0's own formulas for these two, for its published tables
            "mse": results["mse_saebench"], "explained_variance": results["explained_variance_saebench"]},
        "max_cos_latents": weights["max_cos_latents"],
        "average_max_encoder_cosine_sim_stderr": weights["average_max_encoder_cosine_sim_stderr"],
        "average_max_decoder_cosine_sim_stderr": weights["average_max_decoder_cosine_sim_stderr"],
    }
    if not causal:  # an encoder without an LM head: the embedding analogues of the CE/KL scores
        unstructured["embedding_preservation"] = {k: v for k, v in results.items() if k.startswith("embedding_")}
    return {
        "eval_type_id": EVAL_TYPE_ID,
        "eval_config": {
            "model_name": export_cfg.get("model_name", ""),
            "llm_dtype": settings.get("lm_dtype", "float32"),
            "batch_size_prompts": int(settings["batch_contexts"]),
            "n_eval_reconstruction_batches": batches,
            "n_eval_sparsity_variance_batches": batches,
            "dataset": settings["corpus"],
            "context_size": int(settings["context_size"]),
            "compute_kl": causal,
            "compute_ce_loss": causal,
            "compute_l2_norms": True,
            "compute_sparsity_metrics": True,
            "compute_variance_metrics": True,
            "compute_featurewise_density_statistics": True,
            "compute_featurewise_weight_based_metrics": True,
            "exclude_special_tokens_from_reconstruction": True,
            "verbose": False,
        },
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [],
        "eval_result_unstructured": unstructured,
        "sae_bench_commit_hash": "",
        "sae_lens_id": None,
        "sae_lens_release_id": None,
        "sae_lens_version": None,
        "sae_cfg_dict": export_cfg,
    }
