"""Entry points of `sae-dist eval | dashboard | steer` (argparse; `sae_dist.cli` dispatches here).

    sae-dist eval outputs/2026-01-01/12-00-00
    sae-dist dashboard build outputs/2026-01-01/12-00-00 --features 256 --out /tmp/dash
    sae-dist dashboard serve /tmp/dash --port 8000
    sae-dist steer /path/to/run --feature 12 --value 8 --mode clamp --prompt "The"
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from sae_dist.config import ConfigError


def _setup(path: str, device: str, multi_site: bool = False):  # type: ignore[no-untyped-def]
    from sae_dist.features.source import load_setup

    return load_setup(path, device, multi_site)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="run folder (with sae/ inside) or the SAELens export folder")
    p.add_argument("--corpus", default="", help="text to read (default: the run's data.corpus)")
    p.add_argument("--device", default="cpu")


def eval_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sae-dist eval", description="held-out metrics with the SAE spliced in")
    _common(p)
    p.add_argument("--tokens", type=int, default=0,
                   help="held-out tokens to read (default: the run's trainer.eval_tokens, as its training evaluated)")
    p.add_argument("--batch-contexts", type=int, default=0,
                   help="contexts per LM forward pass (default: the run's model.batch_contexts)")
    p.add_argument("--max-cos-latents", type=int, default=16384,
                   help="latents whose max cosine similarity is computed; above it a uniform sample (0 = all)")
    p.add_argument("--out", default="", help="output folder (default: <run>/eval)")
    a = p.parse_args(argv)
    if a.tokens < 0 or a.batch_contexts < 0 or a.max_cos_latents < 0:
        raise ConfigError(f"--tokens ({a.tokens}), --batch-contexts ({a.batch_contexts}) and --max-cos-latents "
                          f"({a.max_cos_latents}) must be >= 0 (0 = the run's own / all)")
    from sae_dist.features.evaluate import run_eval
    from sae_dist.features.source import find_export

    out = a.out or os.path.join(os.path.dirname(os.path.abspath(find_export(a.path))), "eval")
    results = run_eval(_setup(a.path, a.device, multi_site=True), out, a.tokens, a.batch_contexts, a.corpus, a.max_cos_latents)
    spliced = ("lm_loss_recovered", "LM loss recovered") if "lm_loss_recovered" in results else (
        "embedding_recovered", "embedding recovered")
    per_site = "".join(f" {v:.4f}" for v in results.get("fvu_per_site", []))
    if per_site:
        print(f"replacement model: FVU per replaced output{per_site}")  # noqa: T201
    print(f"held-out: FVU {results['fvu']:.4f}  L0 {results['l0']:.1f}  dead {results['dead_fraction']:.2%}  "  # noqa: T201
          f"dense {results['dense_fraction']:.2%}  {spliced[1]} {results[spliced[0]]:.2%}  "
          f"({int(results['tokens'])} tokens; " + (f"{out}/metrics.json)" if "sites" in results else f"SAEBench core: {out}/core.json)"))
    print(json.dumps(results))  # noqa: T201


def dashboard_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sae-dist dashboard", description="feature dashboards (static site)")
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="collect and write the site")
    _common(b)
    b.add_argument("--out", default="", help="site folder (default: <run>/dashboard)")
    b.add_argument("--features", type=int, default=0, help="first N latents (0 = all)")
    b.add_argument("--feature-ids", default="", help="comma-separated latent ids (instead of --features)")
    b.add_argument("--alive", type=int, default=0, metavar="TOKENS",
                   help="with --features N: the first N latents that fire on the split's first TOKENS tokens "
                        "(a probe pass), not the first N ids")
    b.add_argument("--tokens", type=int, default=131072, help="tokens to read")
    b.add_argument("--split", default="train", choices=("train", "heldout"))
    b.add_argument("--top-k", type=int, default=16, help="top contexts per feature")
    b.add_argument("--samples", type=int, default=16, help="quantile samples per feature")
    b.add_argument("--batch-contexts", type=int, default=32)
    b.add_argument("--neuronpedia", action="store_true", help="also write Neuronpedia JSON (~60 KB per feature)")
    s = sub.add_parser("serve", help="serve a built site on 127.0.0.1")
    s.add_argument("dir")
    s.add_argument("--port", type=int, default=8000)
    a = p.parse_args(argv)
    if a.cmd == "serve":
        from sae_dist.features.serve import make_server

        server = make_server(a.dir, a.port)
        print(f"serving {a.dir} at http://127.0.0.1:{server.server_address[1]}/ (Ctrl-C stops)")  # noqa: T201
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            server.server_close()
        return
    from sae_dist.features.dashboard import build_dashboard
    from sae_dist.features.source import find_export

    if a.features < 0 or a.alive < 0:
        raise ConfigError(f"--features ({a.features}) and --alive ({a.alive}) must be >= 0 (0 = all latents / "
                          "the first ids)")
    if a.alive and a.feature_ids:
        raise ConfigError(f"--alive ({a.alive}) picks latents that fire, --feature-ids ({a.feature_ids}) names "
                          "them: give one of the two")
    setup = _setup(a.path, a.device)
    n = setup.sae.n_local
    if a.feature_ids:
        features = torch.tensor([int(i) for i in a.feature_ids.split(",")])
        if features.min() < 0 or features.max() >= n:
            raise ConfigError(f"--feature-ids ({a.feature_ids}) must lie in [0, {n})")
    elif a.alive:
        from sae_dist.features.dashboard import fired_latents

        features = fired_latents(setup, a.features or n, a.alive, a.batch_contexts, a.split, a.corpus)
        if features.numel() == 0:
            raise ConfigError(f"--alive ({a.alive}): no latent fired on the {a.split} split's first {a.alive} "
                              "tokens; read more tokens or leave --alive out")
    else:
        features = torch.arange(min(a.features or n, n))
    out = a.out or os.path.join(os.path.dirname(os.path.abspath(find_export(a.path))), "dashboard")
    info = build_dashboard(setup, out, features, a.tokens, a.batch_contexts, a.split, a.corpus, a.top_k, a.samples,
                           neuronpedia=a.neuronpedia)
    print(f"{info['features']} feature dashboards from {info['tokens']} tokens in {info['seconds']:.1f} s: "  # noqa: T201
          f"{out}/index.html  (serve: sae-dist dashboard serve {out})")


def steer_main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(prog="sae-dist steer", description="generate with a feature clamped or added")
    _common(p)
    p.add_argument("--feature", type=int, required=True)
    p.add_argument("--value", type=float, required=True, help="clamp: the feature's activation; add: coefficient")
    p.add_argument("--mode", default="clamp", choices=("clamp", "add"))
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-new-tokens", type=int, default=32)
    a = p.parse_args(argv)
    from sae_dist.features.steer import generate, steering_fn

    setup = _setup(a.path, a.device)
    if not setup.causal:
        raise ConfigError(f"steer needs a causal LM; {setup.cfg['model_name']!r} has no LM head")
    tok = setup.tokenizer
    base = generate(setup.model, tok, a.prompt, a.max_new_tokens)
    fn = steering_fn(setup.sae, a.feature, a.value, a.mode)
    steered = generate(setup.model, tok, a.prompt, a.max_new_tokens, setup.module, fn)
    print(f"--- baseline\n{tok.decode(base[0], skip_special_tokens=True)}")  # noqa: T201
    print(f"--- feature {a.feature} {a.mode} {a.value}\n{tok.decode(steered[0], skip_special_tokens=True)}")  # noqa: T201


def run(name: str) -> None:
    """Called by sae_dist.cli with sys.argv[1:] holding this subcommand's arguments."""
    fn = {"eval": eval_main, "dashboard": dashboard_main, "steer": steer_main}[name]
    try:
        fn(sys.argv[1:])
    except ConfigError as err:
        print(f"sae-dist {name}: error: {err}", file=sys.stderr)  # noqa: T201
        sys.exit(2)
