"""Every blocking wait in the library, the Hydra plugin and the scripts has a timeout: the source is
parsed and each call to ray.get, ray.wait, <queue>.get, init_process_group or TCPStore must pass
`timeout=` (a queue's get may pass block=False instead)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("sae_dist", "kernels", "hydra_plugins", "scripts")
WAITS = ("ray.get", "ray.wait", "<queue>.get", "init_process_group", "TCPStore")


def _name(node: ast.expr) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    return ""


def _wait_kind(call: ast.Call) -> str | None:
    """Which of WAITS `call` is, or None."""
    func = call.func
    if isinstance(func, ast.Attribute):
        owner = _name(func.value)
        if owner == "ray" and func.attr in ("get", "wait"):
            return f"ray.{func.attr}"
        if func.attr == "get" and "queue" in owner.lower():
            return "<queue>.get"
    if _name(func) in ("init_process_group", "TCPStore"):
        return _name(func)
    return None


def untimed_waits(source: str, filename: str = "<snippet>") -> list[str]:
    """`file:line: call` for every wait in `source` without a timeout keyword."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not isinstance(node, ast.Call) or (kind := _wait_kind(node)) is None:
            continue
        keywords = {k.arg: k.value for k in node.keywords}
        non_blocking = kind == "<queue>.get" and isinstance(keywords.get("block"), ast.Constant) \
            and keywords["block"].value is False
        if "timeout" not in keywords and not non_blocking:
            found.append(f"{filename}:{node.lineno}: {kind}")
    return sorted(found, key=lambda hit: int(hit.split(":")[1]))


def test_every_blocking_wait_in_the_source_has_a_timeout():
    files = sorted(p for d in SCANNED for p in (ROOT / d).rglob("*.py"))
    assert len(files) > 20
    missing = [hit for f in files for hit in untimed_waits(f.read_text(), str(f.relative_to(ROOT)))]
    assert not missing, "waits without timeout= (add one whose error names the setting):\n" + "\n".join(missing)


def test_walker_flags_each_kind_of_wait_without_a_timeout():
    snippet = """
import queue, ray
import torch.distributed as dist
ray.get(ref)
ray.get(ref, timeout=5)
ready, rest = ray.wait(refs, num_returns=1)
self.work_queue.get()
self.work_queue.get(block=False)
results_queue.get(timeout=1)
dist.init_process_group("gloo", init_method="env://")
store = dist.TCPStore("127.0.0.1", 29500, 2, True)
config.get("key")
"""
    assert untimed_waits(snippet) == [
        "<snippet>:4: ray.get", "<snippet>:6: ray.wait", "<snippet>:7: <queue>.get",
        "<snippet>:10: init_process_group", "<snippet>:11: TCPStore",
    ]
