"""A multi-site dictionary spliced into the forward pass as a replacement model (docs/eval.md).

A transcoder replaces its MLP's output by its prediction from that MLP's input; a cross-layer
transcoder replaces all L MLP outputs at once, layer m's by the sum of the decodes into m of the
latents of layers 0..m. The inputs are read from the spliced pass itself: once an earlier output is
replaced, every later input the dictionary reads carries the replacement's error, as in the
replacement model of Circuit Tracing (2025). Special tokens keep their clean values, as with an SAE.

Each replaced site is computed by the family's own encoder and decoder (`Arch.encode_sparse` and
`Arch.decode`) on a batch of the sites reached so far, zeros standing for those not yet reached:
a CLT's latents of layers after m write nothing into layer m (their decoder blocks there are zero),
so the zeros change nothing that is read. The ablation baseline zeroes every replaced output at
every position. The held-out metrics (`sae_dist.metrics.HeldoutMeter`, as training's) compare what
was spliced in with what the model's own modules gave in the same pass: the replaced outputs
concatenated (a CLT's L d, its `d_out`), each one's FVU in `fvu_per_site`, and the codes of all layers,
read at the last replaced site.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from sae_dist.data.lm import find_module, parse_site
from sae_dist.errors import ConfigError
from sae_dist.metrics import HeldoutMeter
from sae_dist.sae import SparseAutoencoder


class SiteSplice:
    """Hooks on every site of a multi-site export (cfg.json `sites`); `active` splices it in."""

    def __init__(self, model: nn.Module, sae: SparseAutoencoder, sites: list[str], meter: HeldoutMeter | None = None):
        self.sae, self.meter, self.sites = sae, meter, list(sites)
        self.replaced = dict(sae.arch.splice_targets(len(sites)))  # site index -> block of the reconstruction
        if not self.replaced:
            raise ConfigError(
                f"a {sae.cfg.arch} over {sites} replaces no module's output in the forward pass (it reconstructs "
                "the sites it reads, all at once); eval splices transcoders and cross-layer transcoders only, and "
                "the run's results.json holds its held-out FVU per site"
            )
        from sae_dist.features.source import resolve_hook

        paths = [parse_site(s) for s in sites]
        self.modules = [(find_module(model, resolve_hook(model, path), "the export's sites"), side) for path, side in paths]
        self.last = max(self.replaced)

    @contextmanager
    def active(self, keep: Tensor | None, zero: bool = False) -> Iterator[None]:
        """While active, each replaced site's output is the dictionary's at the `keep` positions (every
        position where keep is None); with `zero`, the replaced outputs are zeros everywhere instead."""
        got: dict[int, Tensor] = {}
        spliced: dict[int, tuple[Tensor, Tensor]] = {}  # replaced site -> (its own output, the replacement)
        handles = []
        for i, (module, side) in enumerate(self.modules):
            if i in self.replaced:
                handles.append(module.register_forward_hook(self._replacer(i, got, spliced, keep, zero)))
            elif side == "in":
                def pre(_mod: nn.Module, args: tuple, kwargs: dict, i: int = i) -> None:
                    got[i] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))
                handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
            else:
                def post(_mod: nn.Module, _inp: object, out: object, i: int = i) -> None:
                    got[i] = out[0] if isinstance(out, tuple) else out
                handles.append(module.register_forward_hook(post))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _replacer(self, i: int, got: dict[int, Tensor], spliced: dict[int, tuple[Tensor, Tensor]],  # type: ignore[no-untyped-def]
                  keep: Tensor | None, zero: bool):
        sae, d = self.sae, self.sae.d_model

        def hook(_mod: nn.Module, _inp: object, out: object) -> object:
            h = out[0] if isinstance(out, tuple) else out
            assert isinstance(h, Tensor)
            got[i] = h
            if zero:
                new = torch.zeros_like(h)
            else:
                where = keep if keep is not None and keep.shape == h.shape[:2] else torch.ones(
                    h.shape[:2], dtype=torch.bool, device=h.device)
                x = torch.zeros(int(where.sum()), len(self.sites), d, device=h.device)
                for j, v in got.items():
                    x[:, j] = v[where].float()
                vals, idx = sae.encode_sparse(x)
                block = sae.decode(x, vals, idx).view(x.shape[0], -1, d)[:, self.replaced[i]]
                if self.meter is not None:
                    spliced[i] = (h[where], block)
                    if i == self.last:
                        order = sorted(self.replaced)
                        self.meter.add(torch.cat([spliced[j][0].float() for j in order], dim=1), vals, idx,
                                       torch.cat([spliced[j][1] for j in order], dim=1),
                                       sites=len(order) if len(order) > 1 else 0)
                new = h.clone()
                new[where] = block.to(h.dtype)
            return (new, *out[1:]) if isinstance(out, tuple) else new

        return hook
