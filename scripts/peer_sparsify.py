"""EleutherAI's sparsify (eai-sparsify 1.3.3), trained with its own defaults on one of our activation
caches and scored on another with this project's held-out definitions: a peer for our trainer.

It runs in a side venv and imports nothing from sae_dist; it reads the caches' index.json and
safetensors shards itself:

    bash scripts/peer_sparsify_venv.sh                      # -> .venv-sparsify
    .venv-sparsify/bin/python scripts/peer_sparsify.py --train /tmp/acts/train --heldout /tmp/acts/heldout \
        --n-latents 6144 --k 32 --batch-tokens 4096 --tokens 1048576 --out sparsify.json

Training is sparsify's own `Trainer.fit` (sparsify/trainer.py), not a copy of its loop: `CacheModel`
stands in for the language model. The "token ids" the Trainer feeds it are row numbers of the cache,
in (batch_tokens / ctx, ctx) rows in cache order, and its submodule `acts` returns those rows, so the
Trainer's forward hook on `acts` receives exactly the cached activations. Everything the Trainer does
around that hook is its own: the optimizer and learning-rate rule (signum: SignSGD under schedulefree's
ScheduleFreeWrapper, lr 5e-3 / sqrt(n_latents / 2**14)), b_dec set to the first batch's mean, the
unit-norm decoder and its gradient projection, the FVU loss, AuxK (off: auxk_alpha defaults to 0),
the dead-feature counter, and the final checkpoint, which holds the schedule-free average (x) and is
the SAE evaluated here (after fit() the wrapper is back in train mode, so `trainer.saes` hold the
gradient point y, not what sparsify saves). The rows go in cache order, unshuffled, as the Trainer's
DataLoader leaves them (sae-dist's own stream shuffles within blocks). Overridden: num_latents, k, batch_size (sequences of ctx ids), hookpoints,
init_seeds, and, to stay off the network, log_to_wandb=False and save_dir (--save-dir, else temporary).

The held-out figures follow sae_dist/metrics.py's HeldoutMeter: FVU = sum ||x - x^||^2 over
sum ||x - mean x||^2 (float64 sums, raw activations: sparsify 1.3.3 does not rescale its inputs),
L0 = mean number of latents > 0 per token, dead_fraction = latents that never fire on these tokens.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import logging
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here needs the hub; fail rather than fetch

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from sparsify import SparseCoder, SparseCoderConfig, TrainConfig, Trainer  # noqa: E402
from torch import Tensor, nn  # noqa: E402

log = logging.getLogger("peer_sparsify")
HOOKPOINT = "acts"


def read_cache(folder: Path, tokens: int | None = None) -> Tensor:
    """The first `tokens` rows (all if None) of an activation cache, float32 (tokens, d_model)."""
    index = json.loads((folder / "index.json").read_text())
    tokens = index["tokens"] if tokens is None else tokens
    if tokens > index["tokens"]:
        raise ValueError(f"{folder} holds {index['tokens']} tokens, fewer than the {tokens} asked for "
                         "(--tokens or --eval-tokens)")
    out = torch.empty(tokens, index["d_model"])  # (T, d)
    row = 0
    for shard in index["shards"]:
        if row >= tokens:
            break
        acts = load_file(folder / shard["file"])["activations"]
        if acts.shape != (shard["tokens"], index["d_model"]):
            raise ValueError(f"{folder / shard['file']}: activations {tuple(acts.shape)}, index.json says "
                             f"({shard['tokens']}, {index['d_model']})")
        take = min(len(acts), tokens - row)
        out[row : row + take] = acts[:take].float()
        row += take
    return out


class CacheRows(nn.Module):
    """Returns the cache rows whose numbers it is given: (B, ctx) ids -> (B, ctx, d)."""

    rows: Tensor

    def __init__(self, acts: Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", acts, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        return self.rows[ids]


class CacheModel(nn.Module):
    """Stands in for the LM: what sparsify's Trainer uses of a PreTrainedModel (base_model, device,
    dummy_inputs, a forward on input ids), with the hookpoint `acts` yielding cached activations."""

    def __init__(self, acts: Tensor) -> None:
        super().__init__()
        self.acts = CacheRows(acts)

    @property
    def base_model(self) -> CacheModel:
        return self

    @property
    def device(self) -> torch.device:
        return self.acts.rows.device

    @property
    def dummy_inputs(self) -> dict[str, Tensor]:
        return {"input_ids": torch.zeros(1, 1, dtype=torch.long)}

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.acts(input_ids)


@torch.no_grad()
def evaluate(sae: SparseCoder, x_all: Tensor, batch_tokens: int) -> dict[str, float]:
    """sae_dist.metrics.HeldoutMeter's fvu, mse, l0 and dead_fraction over every row of x_all."""
    n = len(x_all)
    err = x2 = l0 = 0.0
    x_sum = torch.zeros(x_all.shape[1], dtype=torch.float64)
    fired = torch.zeros(sae.num_latents, dtype=torch.long)
    for start in range(0, n, batch_tokens):
        x = x_all[start : start + batch_tokens]
        vals, idx, _ = sae.encode(x)  # (B, k)
        x_hat = sae.decode(vals, idx).double()  # (B, d)
        x = x.double()
        err += float((x - x_hat).pow(2).sum())
        x2 += float(x.pow(2).sum())
        x_sum += x.sum(0)
        active = vals > 0
        l0 += float(active.sum())
        fired.index_add_(0, idx[active], torch.ones_like(idx[active]))
    fvu = err / (x2 - float(x_sum.pow(2).sum()) / n)
    return {"fvu": fvu, "explained_variance": 1 - fvu, "mse": err / n, "l0": l0 / n,
            "dead_fraction": float((fired == 0).double().mean()), "tokens": n}


def train(args: argparse.Namespace, acts: Tensor, save_dir: str) -> tuple[Trainer, float]:
    if args.order is not None:  # sae-dist's own order of cache rows (scripts/bench_quality.py writes it)
        ids = load_file(str(args.order))["rows"].view(-1, args.ctx)
    else:
        ids = torch.arange(args.tokens).view(-1, args.ctx)  # (tokens / ctx, ctx): cache rows, in order
    dataset = Dataset.from_dict({"input_ids": ids.tolist()}).with_format("torch")
    cfg = TrainConfig(
        SparseCoderConfig(num_latents=args.n_latents, k=args.k),
        batch_size=args.batch_tokens // args.ctx,
        hookpoints=[HOOKPOINT],
        init_seeds=[args.seed],
        log_to_wandb=False,
        save_dir=save_dir,
        run_name="peer",
    )
    trainer = Trainer(cfg, dataset, CacheModel(acts))  # type: ignore[arg-type]
    start = time.perf_counter()
    trainer.fit()
    return trainer, time.perf_counter() - start


def sparsify_defaults(trainer: Trainer) -> dict:
    opt = trainer.optimizers[0]
    return {
        "train_config": trainer.cfg.to_dict(),
        "optimizer": f"{type(opt).__name__}({type(getattr(opt, 'base', opt)).__name__})",
        "schedule_free": {"momentum": opt.momentum, "weight_lr_power": opt.weight_lr_power, "r": opt.r}
        if hasattr(opt, "momentum") else None,
        "lr": opt.param_groups[0]["lr"],
        "lr_rule": "5e-3 / sqrt(num_latents / 2**14), constant (no scheduler)",
        "auxk_active": trainer.cfg.auxk_alpha > 0,
        "b_dec_init": "mean of the first batch",
        "input_normalisation": "none",
        "evaluated_weights": "final checkpoint: schedule-free average x",
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--train", type=Path, required=True, help="activation cache folder to train on")
    p.add_argument("--heldout", type=Path, required=True, help="activation cache folder to evaluate on")
    p.add_argument("--n-latents", type=int, default=6144)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-tokens", type=int, default=4096)
    p.add_argument("--tokens", type=int, default=1_048_576, help="training tokens, from the start of --train")
    p.add_argument("--ctx", type=int, default=256, help="ids per sequence the Trainer sees (no effect on training)")
    p.add_argument("--seed", type=int, default=0, help="sparsify's init seed")
    p.add_argument("--eval-tokens", type=int, default=None, help="held-out tokens (default: all)")
    p.add_argument("--order", type=Path, default=None,
                   help="safetensors file with `rows` (int64, --tokens of them): the cache rows to train on, "
                        "in this order (default: the first --tokens rows in cache order)")
    p.add_argument("--out", type=Path, required=True, help="JSON file for settings and metrics")
    p.add_argument("--save-dir", type=Path, default=None,
                   help="keep sparsify's checkpoint here (<dir>/peer/acts); default: a temporary folder")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.batch_tokens % args.ctx:
        p.error(f"--batch-tokens ({args.batch_tokens}) must be a multiple of --ctx ({args.ctx})")
    if args.tokens % args.batch_tokens:
        p.error(f"--tokens ({args.tokens}) must be a multiple of --batch-tokens ({args.batch_tokens}): "
                "sparsify's DataLoader would otherwise end on a short batch")

    if args.order is not None:
        rows = load_file(str(args.order))["rows"]
        if rows.numel() != args.tokens:
            p.error(f"--order {args.order} holds {rows.numel()} rows, not --tokens ({args.tokens})")
        acts = read_cache(args.train, int(rows.max()) + 1)
    else:
        acts = read_cache(args.train, args.tokens)
    heldout = read_cache(args.heldout, args.eval_tokens)
    log.info("train %s rows from %s, held-out %s rows from %s", len(acts), args.train, len(heldout), args.heldout)
    with tempfile.TemporaryDirectory() as tmp:
        save_dir = str(args.save_dir or tmp)
        trainer, seconds = train(args, acts, save_dir)
        sae = SparseCoder.load_from_disk(Path(save_dir, "peer", HOOKPOINT))
    metrics = evaluate(sae.eval(), heldout, args.batch_tokens)
    result = {
        "peer": "eai-sparsify", "version": importlib.metadata.version("eai-sparsify"), "torch": torch.__version__,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "steps": trainer.global_step,
        "sparsify_defaults": sparsify_defaults(trainer),
        "train_seconds": seconds,
        "train_tokens_per_s": args.tokens / seconds,
        "heldout": metrics,
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(f"sparsify {result['version']} n={args.n_latents} k={args.k} batch={args.batch_tokens} "
          f"tokens={args.tokens}: FVU {metrics['fvu']:.4f} L0 {metrics['l0']:.1f} "
          f"dead {metrics['dead_fraction']:.2%} over {metrics['tokens']} held-out tokens; "
          f"train {seconds:.0f} s ({result['train_tokens_per_s']:,.0f} tokens/s) -> {args.out}")


if __name__ == "__main__":
    main()
