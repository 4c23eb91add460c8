"""sae-dist: train sparse autoencoders on language-model activations.

    sae-dist                                   # default job: TopK SAE on MiniLM layer 3, CPU, minutes
    sae-dist sae=batchtopk sae.n_latents=16384 trainer.total_tokens=4000000
    sae-dist -m sae.n_latents=6144,12288 hydra.sweep.dir=multirun/sizes   # a sweep; the same again resumes it
    sae-dist -m sae.n_latents=6144,12288 hydra/launcher=ray_sae cluster.address=auto   # members as Ray tasks
    ray job submit --address http://<head>:8265 -- sae-dist cluster=ray cluster.address=auto   # infra/README.md
    sae-dist cache data.cache_dir=/tmp/acts trainer.total_tokens=1000000   # fill an activation cache
    sae-dist data=cache data.cache_dir=/tmp/acts                         # train from it
    sae-dist checkpoint.resume_from=latest hydra.run.dir=outputs/myrun   # resume a killed or preempted run
    sae-dist eval outputs/<date>/<time>                                  # held-out metrics, eval/core.json
    sae-dist dashboard build outputs/<date>/<time> --features 256        # feature dashboards
    sae-dist dashboard serve outputs/<date>/<time>/dashboard
    sae-dist steer <causal-LM run> --feature 12 --value 8 --prompt "The"  # steering

Every field, its meaning and its default: sae_dist/config.py. Config groups: conf/.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sae_dist.config import ConfigError, register_configs, to_config
from sae_dist.preempt import PREEMPTED_EXIT, PreemptedError

CONF_DIR = str(Path(__file__).resolve().parents[1] / "conf")
log = logging.getLogger("sae_dist")
register_configs()


def _guard(fn):  # type: ignore[no-untyped-def]
    def wrapped(raw: DictConfig):  # type: ignore[no-untyped-def]
        try:
            return fn(to_config(raw))
        except ConfigError as err:
            print(f"sae-dist: config error: {err}", file=sys.stderr)
            sys.exit(2)
        except PreemptedError as err:
            print(f"sae-dist: preempted: {err}", file=sys.stderr)
            sys.exit(PREEMPTED_EXIT)

    return wrapped


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@_guard
def train_main(cfg):  # type: ignore[no-untyped-def]
    if cfg.sae.fanout_n_latents:
        from sae_dist.pipeline.fanout import train_fanout

        for res in train_fanout(cfg):
            print(f"n_latents {res['n_latents']}: FVU {res['fvu']:.4f}  L0 {res['l0']:.1f}  dead {res['dead_fraction']:.2%}")
        return None
    from sae_dist.sweep import run_member

    results = run_member(cfg, _train_one)
    if results.get("rank", 0):  # under torchrun only rank 0 reports
        return results["fvu"]
    summary = {k: results[k] for k in ("fvu", "fvu_per_site", "l0", "dead_fraction", "trained_fraction", "dense_fraction", "tokens",
                                       "steps", "group_restarts") if k in results}
    if "fvu_per_site" in results:  # a family across sites: each output site's FVU, on its own variance
        print("held-out: FVU per output site" + "".join(f" {v:.4f}" for v in results["fvu_per_site"]))
    print(f"held-out: FVU {results['fvu']:.4f}  L0 {results['l0']:.1f}  dead {results['dead_fraction']:.2%}"
          f"  (fired in training: {results['trained_fraction']:.2%})")
    print(json.dumps(summary | {"export_dir": results["export_dir"]}))
    return results["fvu"]


def _train_one(cfg):  # type: ignore[no-untyped-def]
    if cfg.cluster.producers or cfg.cluster.kind == "ray":
        from sae_dist.pipeline.group import run_trainer_group

        return run_trainer_group(cfg)
    from sae_dist.run import train

    return train(cfg)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
@_guard
def cache_main(cfg):  # type: ignore[no-untyped-def]
    from sae_dist.data import build_source
    from sae_dist.data.cache import write_cache

    meta = {"model_name": cfg.model.name, "hook_point": cfg.model.hook_point, "corpus": cfg.data.corpus}
    for split, tokens in (("train", cfg.trainer.total_tokens), ("heldout", cfg.trainer.eval_tokens)):
        lm_cfg = type(cfg)(**{**cfg.__dict__, "data": type(cfg.data)(**{**cfg.data.__dict__, "source": "lm"})})
        index = write_cache(build_source(lm_cfg, split).chunks(), f"{cfg.data.cache_dir.rstrip('/')}/{split}", tokens, meta)
        print(f"{split}: {index['tokens']} tokens in {len(index['shards'])} shards")


def _features(name: str):  # type: ignore[no-untyped-def]
    def run() -> None:  # argparse entry points: sae_dist/features/cli.py
        from sae_dist.features.cli import run as run_features

        run_features(name)

    return run


def convert_main() -> None:
    """`sae-dist convert RUN --to circuit-tracer --out DIR`: a run's export in another tool's layout."""
    import argparse

    from sae_dist.circuit_tracer import write_circuit_tracer
    from sae_dist.features.source import find_export

    p = argparse.ArgumentParser(prog="sae-dist convert", description="a run's export in another tool's file layout")
    p.add_argument("path", help="run folder (with sae/ inside) or the export folder")
    p.add_argument("--to", required=True, choices=("circuit-tracer",),
                   help="circuit-tracer: a cross-layer transcoder as circuit-tracer's load_clt reads it")
    p.add_argument("--out", required=True, help="output folder")
    a = p.parse_args()
    try:
        meta = write_circuit_tracer(find_export(a.path), a.out)
    except ConfigError as err:
        print(f"sae-dist convert: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"{a.out}: {meta['n_layers']} layers x {meta['d_transcoder']} latents, top-{meta['k']} per layer "  # noqa: T201
          f"(clt_config.json)")


SUBCOMMANDS = {"cache": cache_main, "convert": convert_main, "eval": _features("eval"), "dashboard": _features("dashboard"),
               "steer": _features("steer")}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if len(sys.argv) > 1 and sys.argv[1] in SUBCOMMANDS:
        fn = SUBCOMMANDS[sys.argv.pop(1)]
        fn()
    else:
        train_main()


if __name__ == "__main__":
    main()
