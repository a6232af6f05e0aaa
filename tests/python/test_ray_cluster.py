"""`cluster.engine = "ray"` on fake Ray clusters on this machine (every node on 127.0.0.1, usage
reporting off): actors land on the nodes the recipe asks for (from Ray's own view), weights go
over `net`, the metrics equal a run in one process; a reservation that cannot be met fails within
its timeout naming what is missing, and one that becomes possible when a node joins proceeds."""
import json
import os
import pathlib
import signal
import subprocess
import threading
import sys
import time

import pytest

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
from ray.cluster_utils import Cluster  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
RLRUN = os.environ.get("RLRUN_EXE", str(ROOT / "target" / "release" / "rlrun"))
FIXTURES = pathlib.Path(os.environ.get("RLRUN_FIXTURES", ROOT / ".fixtures"))
NODE = {"node_ip_address": "127.0.0.1", "object_store_memory": 80 << 20}
# Notice a dead node in seconds, not the default tens of seconds.
HEALTH = {"health_check_period_ms": 500, "health_check_timeout_ms": 500,
          "health_check_failure_threshold": 3}


@pytest.fixture
def cluster():
    c = Cluster(initialize_head=True,
                head_node_args=dict(NODE, num_cpus=0, _system_config=HEALTH))
    yield c
    c.shutdown()


def add(c, group=None, cpus=1):
    labels = {"rlrun.io/group": group} if group else {}
    return c.add_node(num_cpus=cpus, labels=labels, **NODE)


def tiny(run_dir, steps=3):
    return [
        f"model.path={FIXTURES / 'tiny-llama3'}", f"steps={steps}", "data.prompts_per_step=4",
        "rollout.n=4", "rollout.max_tokens=8", "eval.size=4", "eval.max_tokens=4",
        "sync.probe=true", f'logging.run_dir="{run_dir}"', "placement.trainer.threads=1",
        "placement.generator.threads=1",
        # Generators elsewhere turn the off-policy correction on, which weighs by the
        # generators' rounding: compare the computation itself, uncorrected on both sides.
        'algorithm.loss.off_policy.correction="off"',
    ]


def on_ray(timeout_s=60, gpus=0):
    return [
        'cluster.engine="ray"', f"cluster.reserve_timeout_s={timeout_s}",
        "cluster.trainer.labels={ 'rlrun.io/group' = 'trainer' }",
        f"cluster.trainer.gpus={gpus}",
        "cluster.generators.labels={ 'rlrun.io/group' = 'rollout' }",
        "cluster.generators.replicas=2", 'cluster.generators.strategy="strict-spread"',
    ]


def command(sets):
    args = [RLRUN, "recipes/quickstart.toml"]
    for s in sets:
        args += ["--set", s]
    return args


def env(c):
    return dict(os.environ, RAY_ADDRESS=c.address, RLRUN_NODE_IP="127.0.0.1",
                RLRUN_PYTHON=sys.executable, RLRUN_EXE=RLRUN)


def metrics(base):
    (run,) = [p for p in pathlib.Path(base).iterdir() if p.is_dir()]
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def computed(m):
    skip = ("time/", "sync/", "perf/", "generator/", "memory/")
    return {k: v for k, v in m.items()
            if not k.startswith(skip) and not k.endswith("/seconds") and k != "wall_time"
            and not k.startswith("actor/logprob_mismatch") and k != "actor/behavior_kl"}


def actor_pids():
    out = subprocess.run(["pgrep", "-f", f"{RLRUN} actor"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_a_run_on_a_four_node_cluster_places_each_actor_and_equals_the_run_in_one_process(cluster, tmp_path):
    trainer_node = add(cluster, "trainer")
    rollout_nodes = [add(cluster, "rollout"), add(cluster, "rollout")]
    spare = add(cluster)
    out = subprocess.run(command(tiny(tmp_path / "ray") + on_ray()), cwd=ROOT, env=env(cluster),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("PLACEMENT ")]
    placed = json.loads(line[len("PLACEMENT "):])
    # Ray's own view: the node each actor's host runs on.
    by_role = {}
    for a in placed["actors"]:
        by_role.setdefault(a["role"], []).append(a["node_id"])
    assert by_role["trainer"] == [trainer_node.node_id]
    assert sorted(by_role["generator"]) == sorted(n.node_id for n in rollout_nodes)
    used = set(by_role["trainer"] + by_role["generator"])
    assert cluster.head_node.node_id not in used and spare.node_id not in used
    assert placed["sync_backend"] == "net"
    # Every actor listened on loopback.
    assert all(a["addr"].startswith("127.0.0.1:") for a in placed["actors"])

    local = subprocess.run(command(tiny(tmp_path / "local")), cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    a, b = metrics(tmp_path / "local"), metrics(tmp_path / "ray")
    assert [m["kind"] for m in a] == [m["kind"] for m in b]
    compared = 0
    for x, y in zip(a, b):
        cx, cy = computed(x), computed(y)
        assert cx == cy, f"step {x.get('step')}: " + str({k: (cx[k], cy.get(k)) for k in cx if cx[k] != cy.get(k)})
        compared += len(cx)
    assert compared > 30
    for m in b:
        if m["kind"] == "train":
            assert m["sync/backend_net"] == 1.0 and m["sync/probe_logprob_max_diff"] <= 1e-5
    # No rlrun actor process outlives the run.
    deadline = time.time() + 15
    while actor_pids() and time.time() < deadline:
        time.sleep(0.5)
    assert actor_pids() == []


def test_a_reservation_that_cannot_be_met_fails_within_its_timeout_naming_the_shortfall(cluster, tmp_path):
    add(cluster, "trainer")
    add(cluster, "rollout")  # two generators wanted, one rollout node
    t = time.time()
    out = subprocess.run(command(tiny(tmp_path) + on_ray(timeout_s=3)), cwd=ROOT,
                         env=env(cluster), capture_output=True, text=True, timeout=120)
    took = time.time() - t
    assert out.returncode != 0
    err = out.stderr
    assert "could not reserve the generators group within 3 s" in err, err[-3000:]
    assert "{'rlrun.io/group': 'rollout'}" in err and "CPU: 2 needed, the matching nodes have 1" in err, err[-3000:]
    assert took < 60, took
    # A GPU the cluster does not have: named as such.
    out = subprocess.run(command(tiny(tmp_path) + on_ray(timeout_s=2, gpus=1)), cwd=ROOT,
                         env=env(cluster), capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "could not reserve the trainer group" in out.stderr
    assert "GPU: 1 needed, the matching nodes have 0 in all" in out.stderr, out.stderr[-3000:]
    assert actor_pids() == []


def test_a_reservation_proceeds_when_the_missing_node_joins(cluster, tmp_path):
    add(cluster, "trainer")
    add(cluster, "rollout")
    p = subprocess.Popen(command(tiny(tmp_path, steps=1) + on_ray(timeout_s=120)), cwd=ROOT,
                         env=env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert p.poll() is None, "the run must wait for the reservation"
    add(cluster, "rollout")
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0, stderr[-4000:]
    assert "PLACEMENT " in stdout


def wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def train_lines(base):
    runs = [p for p in pathlib.Path(base).iterdir() if p.is_dir()] if pathlib.Path(base).exists() else []
    if not runs or not (runs[0] / "metrics.jsonl").exists():
        return 0
    return sum('"kind":"train"' in l for l in (runs[0] / "metrics.jsonl").read_text().splitlines())


def test_a_rollout_node_removed_during_a_step_restarts_its_generator_on_the_spare(cluster, tmp_path):
    # Steps of the tiny model take ~0.15 s, and adding the spare node takes a second or two of
    # them: enough steps that the node is removed mid-run.
    steps = 16
    long = ["rollout.max_tokens=48", "data.prompts_per_step=8", "sync.probe=false",
            "trainer.lr=1e-3"]
    add(cluster, "trainer")
    rollout = [add(cluster, "rollout"), add(cluster, "rollout")]
    p = subprocess.Popen(command(tiny(tmp_path / "ray", steps) + long + on_ray()), cwd=ROOT,
                         env=env(cluster), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines = []
    threading.Thread(target=lambda: lines.extend(p.stdout), daemon=True).start()
    wait_for(lambda: any(l.startswith("PLACEMENT ") for l in lines), 120, "the placement")
    placed = json.loads(next(l for l in lines if l.startswith("PLACEMENT "))[len("PLACEMENT "):])
    # The spare joins once the generators are placed (else it could have been chosen first).
    spare = add(cluster, "rollout")
    wait_for(lambda: train_lines(tmp_path / "ray") >= 1, 300, "the first step")
    victim = rollout[0]
    victim_actor = next(a for a in placed["actors"] if a["node_id"] == victim.node_id)
    # A machine that dies takes all its processes at once. A fake node's raylet does, but its
    # workers notice only later, by when a run of such tiny steps can be over (it was, once, in
    # CI): end the node's worker with it; its `rlrun actor` follows by --exit-with-parent.
    t = time.monotonic()
    cluster.remove_node(victim, allow_graceful=False)
    try:
        os.kill(victim_actor["host_pid"], signal.SIGKILL)
    except ProcessLookupError:
        pass
    killed_at = train_lines(tmp_path / "ray")
    print(f"node removed in {time.monotonic() - t:.2f} s, after {killed_at} step(s)")
    assert killed_at < steps, "the run ended before the node was removed"
    stderr = p.stderr.read()
    p.wait(timeout=600)
    assert p.returncode == 0, stderr[-4000:]
    assert train_lines(tmp_path / "ray") == steps
    restarted = [json.loads(l[len("RESTARTED "):]) for l in lines if l.startswith("RESTARTED ")]
    assert [r["node_id"] for r in restarted] == [spare.node_id], restarted
    assert restarted[0]["addr"] != victim_actor["addr"]
    assert "waiting for its launcher to start it again" in stderr
    m = [x for x in metrics(tmp_path / "ray") if x["kind"] == "train"]
    assert m[-1]["generator/restarts"] >= 1
    # The uninterrupted run in one process: the same draws and updates at every step.
    local = subprocess.run(command(tiny(tmp_path / "local", steps) + long), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    ref = [x for x in metrics(tmp_path / "local") if x["kind"] == "train"]
    assert [computed(x) for x in m] == [computed(x) for x in ref]
    wait_for(lambda: actor_pids() == [], 15, "no rlrun actor left")


def test_a_dead_trainer_ends_the_run_and_a_re_run_resumes_it_to_the_same_end(cluster, tmp_path):
    steps = 12  # of ~0.15 s each: the kill lands well before the end
    long = ["rollout.max_tokens=48", "data.prompts_per_step=8", "sync.probe=false",
            "trainer.lr=1e-3", "checkpoint.every=2"]
    add(cluster, "trainer")
    add(cluster, "rollout")
    add(cluster, "rollout")
    sets = tiny(tmp_path / "ray", steps) + long + on_ray()
    p = subprocess.Popen(command(sets), cwd=ROOT, env=env(cluster), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    ckpt = lambda: any((d / "checkpoints" / "step-00000002").exists()
                       for d in (tmp_path / "ray").glob("*"))  # noqa: E731
    wait_for(ckpt, 300, "the step-2 checkpoint")
    trainer = subprocess.run(["pgrep", "-f", f"{RLRUN} actor trainer"], capture_output=True,
                             text=True).stdout.split()
    assert len(trainer) == 1, trainer
    subprocess.run(["kill", "-9", trainer[0]], check=True)
    _, stderr = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "the trainer process" in stderr and "rlrun resume" in stderr, stderr[-3000:]
    # The same job submitted again, as the Kubernetes manifests do: it continues that run.
    again = subprocess.run(command(sets + ["cluster.resume_latest=true"]), cwd=ROOT,
                           env=env(cluster), capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming " in again.stderr
    assert len([d for d in (tmp_path / "ray").iterdir() if d.is_dir()]) == 1
    m = [x for x in metrics(tmp_path / "ray") if x["kind"] == "train"]
    assert [x["step"] for x in m][-1] == steps
    local = subprocess.run(command(tiny(tmp_path / "local", steps) + long), cwd=ROOT,
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-4000:]
    ref = {x["step"]: computed(x) for x in metrics(tmp_path / "local") if x["kind"] == "train"}
    # Every step logged after the resume equals the uninterrupted run's.
    for x in m:
        assert computed(x) == ref[x["step"]], x["step"]
    wait_for(lambda: actor_pids() == [], 15, "no rlrun actor left")


def test_a_data_parallel_trainer_on_ray_updates_the_weights_as_one_trainer(cluster, tmp_path):
    from safetensors.torch import load_file

    trainer_node = add(cluster, "trainer", cpus=2)
    add(cluster, "rollout")
    add(cluster, "rollout")
    steps = 2
    dp = ["trainer.micro_batch_tokens=48", "trainer.mini_batches=2", "trainer.lr=1e-3",
          "rollout.max_tokens=12", "checkpoint.every=1", "checkpoint.keep=5"]
    out = subprocess.run(command(tiny(tmp_path / "ray", steps) + dp + on_ray()
                                 + ["cluster.trainer.replicas=2"]),
                         cwd=ROOT, env=env(cluster), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    (line,) = [l for l in out.stdout.splitlines() if l.startswith("PLACEMENT ")]
    trainers = [a for a in json.loads(line[len("PLACEMENT "):])["actors"] if a["role"] == "trainer"]
    assert [a["node_id"] for a in trainers] == [trainer_node.node_id] * 2
    local = subprocess.run(command(tiny(tmp_path / "local", steps) + dp), cwd=ROOT,
                           capture_output=True, text=True, timeout=300)
    assert local.returncode == 0, local.stderr[-4000:]
    for x in metrics(tmp_path / "ray"):
        if x["kind"] == "train":
            assert x["dp/world_size"] == 2 and x["dp/min_rank_tokens"] > 0, x
    runs = {k: next(p for p in (tmp_path / k).iterdir() if p.is_dir()) for k in ["ray", "local"]}
    for step in range(1, steps + 1):
        w = {k: load_file(str(r / "checkpoints" / f"step-{step:08d}" / "trainer" / "policy.safetensors"))
             for k, r in runs.items()}
        worst = max((w["ray"][n] - t).abs().max().item() for n, t in w["local"].items())
        assert worst <= 1e-6 * step, f"step {step}: {worst}"


def test_auto_sync_picks_shared_memory_on_one_node_nccl_between_gpus_else_the_network():
    from rlrun.cluster import auto_backend

    t = {"node_id": "a"}
    same, other = [{"node_id": "a"}] * 2, [{"node_id": "a"}, {"node_id": "b"}]
    assert auto_backend(t, same, 1, 1) == "shm"
    assert auto_backend(t, other, 1, 1) == "nccl"
    assert auto_backend(t, other, 0, 1) == "net"
    assert auto_backend(t, other, 1, 0) == "net"
