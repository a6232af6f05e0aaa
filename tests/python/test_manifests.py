"""`rlrun deploy kubernetes`: the manifests validate offline against the upstream KubeRay and Kueue
CRD schemas (deploy/schemas/) and kubernetes-validate, and each way of breaking them is caught."""
import copy
import os
import pathlib
import subprocess
import sys

import pytest
import yaml

ROOT = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import validate_manifests  # noqa: E402

RLRUN = os.environ.get("RLRUN_EXE", str(ROOT / "target" / "release" / "rlrun"))


def deploy(out, *sets):
    args = [RLRUN, "deploy", "kubernetes", "recipes/quickstart.toml", "--out", str(out)]
    for s in sets:
        args += ["--set", s]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(out.glob("*.yaml"))}


GPU_RUN = (
    "cluster.kubernetes.queue=rl-jobs",
    "cluster.kubernetes.priority=rlrun-production",
    "cluster.trainer.gpus=4",
    "cluster.trainer.node_selector={ pool = 'h200' }",
    "cluster.generators.replicas=2",
    "cluster.generators.gpus=1",
    "cluster.generators.labels={ zone = 'a' }",
)


def test_the_manifests_of_a_gpu_run_validate_and_say_what_the_recipe_says(tmp_path):
    m = deploy(tmp_path, *GPU_RUN)
    assert validate_manifests.problems(list(m.values())) == []
    job = m["rayjob.yaml"]
    labels = job["metadata"]["labels"]
    assert labels["kueue.x-k8s.io/queue-name"] == "rl-jobs"
    assert labels["kueue.x-k8s.io/priority-class"] == "rlrun-production"
    assert job["spec"]["suspend"] is True and job["spec"]["shutdownAfterJobFinishes"] is True
    spec = job["spec"]["rayClusterSpec"]
    assert spec["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    trainer, rollout = groups["trainer"], groups["rollout"]
    res = trainer["template"]["spec"]["containers"][0]["resources"]
    assert res["limits"]["nvidia.com/gpu"] == "4" == res["requests"]["nvidia.com/gpu"]
    assert trainer["replicas"] == 1 and rollout["replicas"] == 2
    assert trainer["template"]["spec"]["nodeSelector"] == {"pool": "h200"}
    assert rollout["labels"] == {"rlrun.io/group": "rollout", "zone": "a"}
    assert rollout["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    # The pods read the resolved recipe, the token from the Secret, and write runs on the claim.
    recipe = m["configmap.yaml"]["data"]["recipe.toml"]
    assert "[cluster.kubernetes]" in recipe and 'queue = "rl-jobs"' in recipe
    # ... to run on Ray, each group pinned to its worker group's Ray nodes.
    import tomllib
    cl = tomllib.loads(recipe)["cluster"]
    assert cl["engine"] == "ray"
    assert cl["trainer"]["labels"] == {"rlrun.io/group": "trainer"}
    assert cl["generators"]["labels"] == {"rlrun.io/group": "rollout", "zone": "a"}
    assert len(m["secret.yaml"]["stringData"]["token"]) == 48
    assert "logging.run_dir" in job["spec"]["entrypoint"]
    classes = {d["metadata"]["name"]: d["value"] for d in m.values() if d["kind"] == "WorkloadPriorityClass"}
    assert classes["rlrun-production"] > classes["rlrun-experiment"]


def test_a_data_parallel_trainer_is_one_pod_holding_every_rank(tmp_path):
    m = deploy(tmp_path, "cluster.trainer.replicas=4", "cluster.trainer.gpus=1",
               "cluster.trainer.cpus=8", "cluster.trainer.memory_gb=32")
    assert validate_manifests.problems(list(m.values())) == []
    (trainer,) = [g for g in m["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
                  if g["groupName"] == "trainer"]
    assert trainer["replicas"] == 1
    res = trainer["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert res == {"cpu": "32", "memory": "131072Mi", "nvidia.com/gpu": "4"}


def test_without_a_queue_the_job_is_not_suspended_and_still_validates(tmp_path):
    m = deploy(tmp_path)
    job = m["rayjob.yaml"]
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"]
    assert job["spec"]["suspend"] is False
    assert validate_manifests.problems(list(m.values())) == []


def typo(m):
    s = m["rayjob.yaml"]["spec"]
    s["shutdownAfterJobFinshes"] = s.pop("shutdownAfterJobFinishes")


def wrong_type(m):
    m["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"


def missing_required(m):
    del m["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["groupName"]


def gpu_without_limit(m):
    g = m["rayjob.yaml"]["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    del g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]


def queue_without_suspend(m):
    m["rayjob.yaml"]["spec"]["suspend"] = False


def core_kind_typo(m):
    m["secret.yaml"]["stringDta"] = m["secret.yaml"].pop("stringData")


@pytest.mark.parametrize(
    "break_it, expected",
    [
        (typo, ["shutdownAfterJobFinshes", "Additional properties"]),
        (wrong_type, ["workerGroupSpecs.0.replicas", "'one' is not of type 'integer'"]),
        (missing_required, ["workerGroupSpecs.1", "'groupName' is a required property"]),
        (gpu_without_limit, ["group trainer", "GPU request 4 without an equal limit"]),
        (queue_without_suspend, ["Kueue queue label", "suspend: true"]),
        (core_kind_typo, ["Secret quickstart-token", "stringDta"]),
    ],
    ids=lambda x: getattr(x, "__name__", None),
)
def test_each_way_of_breaking_them_is_caught(tmp_path, break_it, expected):
    m = deploy(tmp_path, *GPU_RUN)
    broken = copy.deepcopy(m)
    break_it(broken)
    found = validate_manifests.problems(list(broken.values()))
    assert found, f"{break_it.__name__} was not caught"
    assert any(all(e in line for e in expected) for line in found), found


def test_the_command_line_validator_fails_on_a_broken_file(tmp_path):
    deploy(tmp_path, *GPU_RUN)
    ok = subprocess.run([sys.executable, str(ROOT / "scripts" / "validate_manifests.py"), str(tmp_path)],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout
    job = tmp_path / "rayjob.yaml"
    job.write_text(job.read_text().replace("suspend: true", "suspend: false"))
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "validate_manifests.py"), str(tmp_path)],
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "suspend" in bad.stdout, bad.stdout
