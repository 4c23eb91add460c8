"""The architecture registry: one module per family, found by `sae.arch`; nothing outside
sae_dist/archs asks which family it is; every family exports and loads back (and in SAELens, where
installed), with its own validated config."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

from sae_dist import archs
from sae_dist.config import ConfigError, sae_config
from sae_dist.export import export_saelens, load_saelens
from sae_dist.sae import SparseAutoencoder

ROOT = Path(__file__).resolve().parents[1]
OWN = {"matryoshka": {"prefixes": [12, 48, 96]}, "jumprelu": {"init_l0": 0}, "gated": {"init_l0": 0}}


def test_registry_has_every_family_each_with_its_yaml():
    assert {"topk", "batchtopk", "matryoshka", "jumprelu", "gated", "relu"} <= set(archs.names())
    for name in archs.names():
        family = archs.get(name)
        assert family.name == name and family.config().arch == name
        assert (ROOT / "conf" / "sae" / f"{name}.yaml").exists(), name


def test_no_family_name_is_tested_outside_the_architecture_modules():
    """What an architecture is lives in its module: no `arch == "..."`, `arch in (...)` or
    `arch != "..."` anywhere else in the library, the kernels or the scripts."""
    pattern = re.compile(r"""arch\s*(==|!=|\bin\b|\bnot in\b)\s*[\("'\[]""")
    found = []
    for top in ("sae_dist", "kernels", "scripts"):
        for path in (ROOT / top).rglob("*.py"):
            if "archs" in path.relative_to(ROOT).parts:
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if pattern.search(line):
                    found.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_sae_module_knows_nothing_of_torch_distributed():
    for path in [ROOT / "sae_dist" / "sae.py", *(ROOT / "sae_dist" / "archs").glob("*.py")]:
        assert not re.search(r"import torch\.distributed|from torch import distributed|\bdist\.", path.read_text()), path


def test_config_errors_name_the_field_the_value_and_the_fix():
    with pytest.raises(ConfigError, match=r"sae\.arch \('topkk'\) must be one of .*topk"):
        sae_config(arch="topkk")
    with pytest.raises(ConfigError, match=r"sae\.arch=jumprelu has no field sae\.k_aux .*`sae=jumprelu`"):
        sae_config(arch="jumprelu", k_aux=4)
    with pytest.raises(ConfigError, match=r"sae\.prefixes \(\[64, 32, 128\]\) must rise strictly"):
        sae_config(arch="matryoshka", n_latents=128, prefixes=[64, 32, 128])
    with pytest.raises(ConfigError, match=r"sae\.bandwidth \(0\.0\) must be > 0"):
        sae_config(arch="jumprelu", bandwidth=0.0)
    assert sae_config(arch="matryoshka", n_latents=6144).prefix_sizes() == [96, 384, 1536, 6144]


def test_sparse_encoder_refuses_more_active_latents_than_max_active():
    sae = SparseAutoencoder(sae_config(arch="jumprelu", n_latents=64, k=4, init_l0=0, max_active=8), 8)
    with torch.no_grad():
        sae.b_enc.fill_(5.0)  # every latent far above its threshold
    with pytest.raises(archs.base.ActiveCapError, match=r"64 active latents .*sae\.max_active \(8\)"):
        sae(torch.randn(4, 8))


def _sites(name: str) -> int:
    """Sites per token in these tests: 0 (one) for an SAE, the family's own count, or 4 where it takes
    any number (a crosscoder's sites; a CLT's 2 layers' inputs and outputs)."""
    sites = archs.get(name).sites
    return 0 if sites == 1 else sites or 4


def _trained_like(name: str) -> SparseAutoencoder:
    g = torch.Generator().manual_seed(0)
    family = archs.get(name)
    sae = SparseAutoencoder(sae_config(arch=name, n_latents=96, k=6, **OWN.get(name, {})),
                            family.width(32, _sites(name)), d_out=family.out_width(32, _sites(name)), generator=g)
    with torch.no_grad():
        sae.b_dec.normal_(generator=g)
        sae.b_enc.normal_(std=0.1, generator=g)
        for extra in ("r_mag", "b_mag"):
            if hasattr(sae, extra):
                getattr(sae, extra).normal_(std=0.2, generator=g)
        if hasattr(sae, "log_threshold"):
            sae.log_threshold.fill_(-1.0)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.3)
        if hasattr(sae, "W_skip"):
            sae.W_skip.normal_(std=0.1, generator=g)
    return sae.eval()


def _inputs(name: str, rows: int = 20, d: int = 32) -> torch.Tensor:
    """A batch for the family: (rows, d), or (rows, sites, d) for a multi-site family."""
    shape = (rows, _sites(name), d) if _sites(name) else (rows, d)
    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("name", sorted(archs.names()))
def test_every_family_exports_and_loads_back_with_the_same_codes(tmp_path, name):
    ours = _trained_like(name)
    cfg = export_saelens(ours, 1.7, str(tmp_path), {"hook_name": "blocks.0.hook_resid_post"})
    assert cfg["architecture"] == archs.get(name).saelens_architecture and cfg["sae_dist_arch"] == name
    back, _ = load_saelens(str(tmp_path))
    x = _inputs(name)
    with torch.no_grad():
        want = ours.decode(x * 1.7, *ours.encode_sparse(x * 1.7)) / 1.7
        got = back.decode(x, *back.encode_sparse(x))
        assert (ours.encode(x * 1.7) > 0).any()
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


@pytest.mark.parametrize("name", sorted(archs.names()))
def test_every_family_loads_in_saelens_with_the_same_reconstruction(tmp_path, name):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens not installed (pip install 'sae-dist[interop]')")
    if archs.get(name).sites != 1:
        pytest.skip("multi-site families: SAELens applies a ReLU where ours keep the top k; "
                    "tests/test_peer_metrics.py checks the transcoders in SAELens's transcoder layout")
    ours = _trained_like(name)
    export_saelens(ours, 1.7, str(tmp_path), {"hook_name": "blocks.0.hook_resid_post", "model_name": "gpt2",
                                              "context_size": 32})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path))
    x = torch.randn(20, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ours.decode_sparse(*ours.encode_sparse(x * 1.7)) / 1.7
        got = theirs.decode(theirs.encode(x))
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()


def test_adding_a_family_needs_no_edit_outside_its_module(tmp_path, monkeypatch):
    """A family defined in a new module registers itself and trains through the whole stack."""
    import sys

    src = '''
from dataclasses import dataclass
from sae_dist.archs import register
from sae_dist.archs.topk import TopK, TopKConfig

@dataclass
class HalfKConfig(TopKConfig):
    arch: str = "halfk"

@register
class HalfK(TopK):
    name = "halfk"
    config = HalfKConfig
'''
    (tmp_path / "halfk_family.py").write_text(src)
    monkeypatch.syspath_prepend(str(tmp_path))
    import halfk_family  # noqa: F401
    from conftest import synthetic_config

    from sae_dist.run import train

    try:
        out = train(synthetic_config(tmp_path, sae={"arch": "halfk"}, trainer={"total_tokens": 256 * 3}))
        assert os.path.exists(os.path.join(out["export_dir"], "cfg.json"))
    finally:
        archs._REGISTRY.pop("halfk", None)
        sys.modules.pop("halfk_family", None)
