"""infra/ and the cluster scripts: the files parse, reference what exists (entry points, extras, config
groups and fields: every `sae-dist` command in them composes), the Dockerfile passes a small lint of our
own (no Docker engine or hadolint here), and local_s3.py + export_sae.py round-trip a checkpoint."""

from __future__ import annotations

import glob
import os
import re
import shlex
import socket
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INFRA = os.path.join(ROOT, "infra")
GPU_EXTRAS = {"ray", "s3", "deepspeed", "triton"}


def _pyproject() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as fh:
        return tomllib.load(fh)


def _yaml_files() -> list[str]:
    return sorted(glob.glob(os.path.join(INFRA, "**", "*.yaml"), recursive=True))


def _docs(path: str) -> list:
    with open(path) as fh:
        return [d for d in yaml.safe_load_all(fh) if d is not None]


def test_every_infra_yaml_parses():
    files = _yaml_files()
    assert {os.path.relpath(f, INFRA) for f in files} >= {"ray/aws.yaml", "ray/gcp.yaml", "kuberay/raycluster.yaml",
                                                          "kuberay/rayjob.yaml"}
    for path in files:
        assert _docs(path), path


def _image_tag(image: str) -> str:
    return image.rsplit(":", 1)[1]


@pytest.mark.parametrize("cloud", ["aws", "gcp"])
def test_ray_launcher_config_has_gpu_workers_storage_identity_and_the_project_image(cloud):
    (cfg,) = _docs(os.path.join(INFRA, "ray", f"{cloud}.yaml"))
    assert cfg["provider"]["type"] == cloud
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    gpu_types = [name for name, t in types.items() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(types[n]["max_workers"] >= 1 for n in gpu_types)
    for name, t in types.items():
        node = t["node_config"]
        if cloud == "aws":
            assert node["IamInstanceProfile"]["Arn"].startswith("arn:aws:iam::"), name
        else:
            (account,) = node["serviceAccounts"]
            assert account["email"].endswith(".iam.gserviceaccount.com"), name
            assert "https://www.googleapis.com/auth/cloud-platform" in account["scopes"], name
            if name in gpu_types:  # GCP needs it for GPU VMs
                assert node["scheduling"][0]["onHostMaintenance"] == "TERMINATE", name
    assert _image_tag(cfg["docker"]["image"]) == _pyproject()["project"]["version"]
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("ray start --address" in c for c in cfg["worker_start_ray_commands"])


def _dockerfile_arg(name: str) -> str:
    with open(os.path.join(INFRA, "Dockerfile")) as fh:
        (value,) = re.findall(rf"^ARG {name}=(\S+)$", fh.read(), re.M)
    return value


def test_kuberay_manifests_request_gpus_share_identity_and_volume_and_match_the_image():
    cluster_docs = {d["kind"]: d for d in _docs(os.path.join(INFRA, "kuberay", "raycluster.yaml"))}
    (job,) = _docs(os.path.join(INFRA, "kuberay", "rayjob.yaml"))
    assert set(cluster_docs) == {"ServiceAccount", "PersistentVolumeClaim", "RayCluster"} and job["kind"] == "RayJob"
    account, claim = cluster_docs["ServiceAccount"]["metadata"]["name"], cluster_docs["PersistentVolumeClaim"]["metadata"]["name"]
    assert set(cluster_docs["ServiceAccount"]["metadata"]["annotations"]) == {
        "eks.amazonaws.com/role-arn", "iam.gke.io/gcp-service-account"}
    version = _pyproject()["project"]["version"]
    for spec in (cluster_docs["RayCluster"]["spec"], job["spec"]["rayClusterSpec"]):
        assert spec["rayVersion"] == _dockerfile_arg("RAY_VERSION")
        pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
        for pod in pods:
            assert pod["serviceAccountName"] == account
            assert claim in {v.get("persistentVolumeClaim", {}).get("claimName") for v in pod["volumes"]}
            for container in pod["containers"]:
                assert _image_tag(container["image"]) == version
        for group in spec["workerGroupSpecs"]:
            (container,) = group["template"]["spec"]["containers"]
            assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert job["apiVersion"] == cluster_docs["RayCluster"]["apiVersion"] == "ray.io/v1"


def _strings(node) -> list[str]:  # type: ignore[no-untyped-def]
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    return [node] if isinstance(node, str) else []


def _commands() -> list[tuple[str, list[str]]]:
    """(where, args after `sae-dist`) for every sae-dist command in infra/: YAML strings and the README's
    code blocks (backslash continuations joined)."""
    texts = [(f, s) for f in _yaml_files() for d in _docs(f) for s in _strings(d)]
    with open(os.path.join(INFRA, "README.md")) as fh:
        blocks = re.findall(r"```bash\n(.*?)```", fh.read(), re.S)
    texts += [("infra/README.md", line) for b in blocks for line in b.replace("\\\n", " ").splitlines()]
    found = []
    for where, text in texts:
        for line in text.splitlines() or [text]:
            line = line.split(" #", 1)[0]
            if re.search(r"(^|\s|--\s)sae-dist\s", line) and "<" not in line:
                args = shlex.split(line[line.index("sae-dist") + len("sae-dist"):])
                found.append((os.path.relpath(where, ROOT) if os.path.isabs(where) else where, args))
    return found


def test_every_sae_dist_command_in_infra_composes_against_conf_and_the_schemas():
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from sae_dist.cli import CONF_DIR, SUBCOMMANDS
    from sae_dist.config import to_config

    commands = _commands()
    assert len(commands) >= 6, commands
    parser = OverridesParser.create()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for where, args in commands:
            args = [a for a in args if a not in ("-m", "--multirun")]
            assert not args or args[0] not in SUBCOMMANDS or args[0] == "cache", (where, args)
            args = args[1:] if args and args[0] == "cache" else args
            overrides = []
            for o in parser.parse_overrides(args):  # a sweep composes as its first value
                value = next(iter(o.sweep_string_iterator())) if o.is_sweep_override() else o.get_value_element_as_str()
                overrides.append(f"{o.get_key_element()}={value}")
            cfg = compose("config", overrides=[*overrides, "output_dir=/tmp/x"], return_hydra_config=True)
            to_config(compose("config", overrides=[*overrides, "output_dir=/tmp/x"]))  # the cross-field checks
            if "hydra/launcher=ray_sae" in overrides:
                assert cfg.hydra.launcher._target_.endswith("RaySaeLauncher"), where


def test_entry_point_extras_and_launcher_plugin_exist():
    project = _pyproject()
    assert project["project"]["scripts"]["sae-dist"] == "sae_dist.cli:main"
    from sae_dist.cli import main

    assert callable(main)
    packages = project["tool"]["setuptools"]["packages"]
    assert "hydra_plugins.sae_dist_ray_launcher" in packages and "hydra_plugins" in packages
    assert not os.path.exists(os.path.join(ROOT, "hydra_plugins", "__init__.py"))  # a namespace package
    from hydra.core.plugins import Plugins
    from hydra.plugins.launcher import Launcher

    names = {p.__name__ for p in Plugins.instance().discover(Launcher)}
    assert "RaySaeLauncher" in names
    assert GPU_EXTRAS <= set(project["project"]["optional-dependencies"])


def _instructions(text: str) -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^\s*(\w+)\s+(.*)$", joined, re.M)]


def lint_dockerfile(text: str, extras: set[str], root: str = ROOT, torch_pin: str | None = None) -> list[str]:
    """Our rules: FROM first with a pinned, non-latest tag; apt installs without recommends and with the
    lists removed in the same layer; the project installed with the GPU extras (which exist) and not
    vllm; COPY sources that exist; a non-root USER; no secrets in ENV/ARG; torch pinned as the CPU pin."""
    problems = []
    inst = _instructions(text)
    if not inst or inst[0][0] != "FROM":
        problems.append("the first instruction must be FROM")
    for op, arg in inst:
        if op == "FROM":
            image = arg.split()[0]
            if "@" not in image and (":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest")):
                problems.append(f"FROM {image}: pin a tag other than latest")
        if op == "RUN" and "apt-get install" in arg:
            if "--no-install-recommends" not in arg:
                problems.append("apt-get install without --no-install-recommends")
            if "rm -rf /var/lib/apt/lists" not in arg:
                problems.append("apt-get install without removing /var/lib/apt/lists in the same RUN")
        if op == "RUN" and re.search(r"apt-get update\s*$", arg):
            problems.append("apt-get update alone in a RUN (a cached layer installs stale lists)")
        if op == "COPY":
            for src in shlex.split(arg)[:-1]:
                if not src.startswith("--") and not glob.glob(os.path.join(root, src)):
                    problems.append(f"COPY {src}: no such path in the repository")
        if op in ("ENV", "ARG") and re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", arg, re.I):
            problems.append(f"{op} {arg.split('=')[0]}: no secrets in the image")
    installs = [arg for op, arg in inst if op == "RUN" and re.search(r"pip install .*-e \"?\.\[", arg)]
    if not installs:
        problems.append("no `pip install -e .[extras]` of the project")
    for arg in installs:
        wanted = set(re.search(r"\.\[([^\]]*)\]", arg).group(1).split(","))
        if not GPU_EXTRAS <= wanted:
            problems.append(f"the project install misses GPU extras {sorted(GPU_EXTRAS - wanted)}")
        if wanted - extras:
            problems.append(f"extras {sorted(wanted - extras)} are not in pyproject.toml")
        if "vllm" in wanted:
            problems.append("vllm is not installed in the image (it pins its own torch)")
    users = [arg for op, arg in inst if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the image must end as a non-root USER")
    torch_arg = [arg for op, arg in inst if op == "ARG" and arg.startswith("TORCH_VERSION=")]
    if torch_pin and torch_arg != [f"TORCH_VERSION={torch_pin}"]:
        problems.append(f"ARG TORCH_VERSION must be {torch_pin} (constraints/cpu.txt)")
    return problems


def test_dockerfile_passes_the_lint():
    with open(os.path.join(INFRA, "Dockerfile")) as fh:
        text = fh.read()
    with open(os.path.join(ROOT, "constraints", "cpu.txt")) as fh:
        (pin,) = re.findall(r"^torch==(\S+)$", fh.read(), re.M)
    assert lint_dockerfile(text, set(_pyproject()["project"]["optional-dependencies"]), torch_pin=pin) == []


def test_dockerfile_lint_catches_each_rule():
    bad = """RUN echo hi
FROM ubuntu:latest
ENV AWS_SECRET_ACCESS_KEY=x
RUN apt-get update
RUN apt-get install -y curl
COPY nowhere ./nowhere
RUN pip install -e ".[ray,vllm,nope]"
"""
    problems = "\n".join(lint_dockerfile(bad, {"ray", "vllm"}))
    for rule in ("first instruction", "latest", "secrets", "alone in a RUN", "no-install-recommends",
                 "/var/lib/apt/lists", "COPY nowhere", "misses GPU extras", "['nope']", "vllm is not", "non-root"):
        assert rule in problems, rule


def test_local_s3_serves_checkpoints_that_export_sae_converts(tmp_path):
    pytest.importorskip("moto")
    pytest.importorskip("s3fs")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inner = (f"{shlex.quote(sys.executable)} -m sae_dist data=synthetic model.d_model=16 sae.n_latents=64 sae.k=4 "
             "trainer.total_tokens=2048 trainer.batch_tokens=256 trainer.eval_tokens=512 trainer.scale_tokens=256 "
             f"data.shuffle_buffer_tokens=0 checkpoint=s3 checkpoint.url=s3://ckpt/runs tracking=none "
             f"hydra.run.dir={tmp_path}/run && {shlex.quote(sys.executable)} {ROOT}/scripts/export_sae.py "
             f"s3://ckpt/runs/sae {tmp_path}/out")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "local_s3.py"), "--port", str(port),
                           "--bucket", "ckpt", "--run", "--", "sh", "-c", inner],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 8: 64 latents x d_in 16" in proc.stdout
    from safetensors.torch import load_file

    exported, trained = load_file(f"{tmp_path}/out/sae_weights.safetensors"), load_file(f"{tmp_path}/run/sae/sae_weights.safetensors")
    assert exported.keys() == trained.keys() and all((exported[k] == trained[k]).all() for k in trained)
