"""Dependencies point one way: activation sources (sae_dist/data) never reach the Ray pipeline that
drives them, and the SAE's model code never touches torch.distributed (parallelism is applied from
outside). Imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sae_dist"


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
    return out


def offenders(files: list[Path], banned: tuple[str, ...]) -> list[str]:
    return sorted(f"{f.parent.name}/{f.name} imports {m}" for f in files for m in imported_modules(f)
                  if m.startswith(banned))


@pytest.mark.parametrize(("package", "banned"), [
    ("data", ("sae_dist.pipeline", "sae_dist.parallel", "sae_dist.lifecycle", "sae_dist.run")),
    ("archs", ("torch.distributed", "sae_dist.parallel", "sae_dist.pipeline")),
])
def test_package_does_not_import_the_layers_above_it(package, banned):
    files = sorted((ROOT / package).glob("*.py"))
    assert files
    assert offenders(files, banned) == []


def test_model_file_does_not_import_torch_distributed():
    assert offenders([ROOT / "sae.py"], ("torch.distributed",)) == []


def test_the_walker_sees_an_import_inside_a_function(tmp_path):
    f = tmp_path / "probe.py"
    f.write_text("def f():\n    from sae_dist.pipeline.launch import init_ray\n")
    assert offenders([f], ("sae_dist.pipeline",)) == [f"{tmp_path.name}/probe.py imports sae_dist.pipeline.launch"]
