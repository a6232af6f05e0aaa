"""rlrun on a Ray cluster: ``python -m rlrun.cluster run recipe.toml [--set key=value]...``

What ``rlrun recipe.toml`` runs when the recipe says ``[cluster] engine = "ray"``:

1. joins the Ray cluster (``cluster.address``, else ``RAY_ADDRESS``, else ``auto``);
2. reserves the trainer group as one gang (a placement group, ``cluster.trainer.strategy``,
   STRICT_PACK by default) and the generators as their own group (one bundle each,
   ``cluster.generators.strategy``), pinned to nodes with ``labels`` when the recipe gives them; a
   reservation not met within ``cluster.reserve_timeout_s`` fails with what is missing (GPUs,
   CPUs, labels), never a silent wait;
3. starts each ``rlrun actor`` process inside a small Ray actor on its bundle (which sets the
   bundle's ``CUDA_VISIBLE_DEVICES``); every actor listens on its node's address with the run's
   token (one per run, or ``placement.token_file`` / ``RLRUN_TOKEN_FILE``);
4. runs ``rlrun`` as the controller with those addresses (weights through shared memory when
   every generator shares the trainer's Ray node, else broadcast over NCCL when both sides have
   GPUs, else over ``net``), and releases everything when it ends.

GPU reservations are what placement groups give: a bundle's GPUs are the node's devices Ray
assigns to it, nothing finer. A generator host whose node fails is restarted by Ray on another
node with room (``max_restarts=-1``); the driver writes its new address into the addresses file
the controller's pool re-reads, and the pool sends it the current weights and re-queues its
unfinished requests. A trainer that dies ends the run with the "continue with resume" error.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time

try:
    import tomllib
except ImportError:  # Python < 3.11
    raise ImportError("rlrun.cluster needs Python 3.11 or later (tomllib)") from None

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from ray.util.placement_group import placement_group, remove_placement_group  # noqa: E402
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy  # noqa: E402


class ReservationError(RuntimeError):
    """A placement group was not ready within its timeout."""


def pin_node_ip(ip):
    """Makes this driver reach the cluster as `ip` (RLRUN_NODE_IP, e.g. 127.0.0.1 for nodes that
    listen on loopback only): Ray otherwise replaces a loopback address by the machine's outward
    one, which such nodes do not serve."""
    import ray._private.services as services

    services.resolve_ip_for_localhost = lambda host: ip if services.is_localhost(host) else host
    services.get_node_ip_address = lambda address=None: ip


def rlrun_exe():
    exe = os.environ.get("RLRUN_EXE") or shutil.which("rlrun")
    if not exe:
        raise RuntimeError("the rlrun binary: set RLRUN_EXE or put rlrun on the PATH")
    return os.path.abspath(exe)


def set_args(sets):
    out = []
    for s in sets:
        out += ["--set", s]
    return out


def resolved(exe, recipe, sets):
    """The recipe as `rlrun check` resolves it (defaults filled in, overrides applied)."""
    out = subprocess.run([exe, "check", recipe, *set_args(sets)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip() or out.stdout.strip())
    return tomllib.loads(out.stdout)


def bundle(group):
    b = {"CPU": float(group["cpus"])}
    if group["gpus"]:
        b["GPU"] = float(group["gpus"])
    return b


def shortfall(name, bundles, labels, timeout):
    """Why `bundles` (all alike) could not be reserved, in words."""
    alive = [n for n in ray.nodes() if n.get("Alive")]
    matching = [n for n in alive if all((n.get("Labels") or {}).get(k) == v for k, v in labels.items())]
    where = f" on nodes labelled {labels}" if labels else ""
    parts = [f"could not reserve the {name} group within {timeout:g} s: it needs "
             f"{len(bundles)} bundle(s) of {bundles[0]}{where}"]
    if labels and not matching:
        parts.append(f"no alive node has the labels {labels}")
    need = {r: v * len(bundles) for r, v in bundles[0].items()}
    for r, v in need.items():
        have = sum((n.get("Resources") or {}).get(r, 0.0) for n in matching)
        free = ray.available_resources().get(r, 0.0)
        if have < v:
            parts.append(f"{r}: {v:g} needed, the {'matching ' if labels else ''}nodes have {have:g} in all")
        elif free < v:
            parts.append(f"{r}: {v:g} needed, {free:g} free now (the rest is held by others)")
        else:
            # Enough in all, but not on the nodes the strategy allows (e.g. one node for a gang).
            best = max(((n.get("Resources") or {}).get(r, 0.0) for n in matching), default=0.0)
            if best < bundles[0][r]:
                parts.append(f"{r}: a bundle needs {bundles[0][r]:g} on one node, the largest has {best:g}")
    return "; ".join(parts)


def reserve(name, group, count, deadline, timeout):
    """A ready placement group of `count` bundles for `group` by `deadline` (the run's
    reservations share `timeout` seconds), or ReservationError."""
    bundles = [bundle(group)] * count
    labels = dict(group.get("labels") or {})
    strategy = group["strategy"].upper().replace("-", "_")
    kw = {"bundle_label_selector": [labels] * count} if labels else {}
    pg = placement_group(bundles, strategy=strategy, name=f"rlrun-{name}", **kw)
    ready, _ = ray.wait([pg.ready()], timeout=max(0.1, deadline - time.time()))
    if not ready:
        why = shortfall(name, bundles, labels, timeout)
        remove_placement_group(pg)
        raise ReservationError(why)
    return pg


class ActorHost:
    """A Ray actor that runs one `rlrun actor` process on its bundle and reports its address."""

    def __init__(self, exe, role, config, token):
        import ray as _ray
        import subprocess as _sp
        import tempfile as _tf
        import threading as _th

        d = _tf.mkdtemp(prefix="rlrun-actor-")
        cfg, tok = os.path.join(d, "actor.json"), os.path.join(d, "token")
        with open(cfg, "w") as f:
            f.write(config)
        fd = os.open(tok, os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        ip = _ray.util.get_node_ip_address()
        # --exit-with-parent: the process ends with this Ray worker, however it ends.
        self.proc = _sp.Popen(
            [exe, "actor", role, "--listen", f"{ip}:0", "--config", cfg, "--token-file", tok,
             "--exit-with-parent"],
            stdout=_sp.PIPE, text=True)
        self.addr = None
        for line in self.proc.stdout:
            if line.startswith("LISTENING "):
                self.addr = line.split()[1]
                break
        if self.addr is None:
            raise RuntimeError(f"rlrun actor {role} exited before listening ({self.proc.wait()})")
        _th.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()
        ctx = _ray.get_runtime_context()
        self.node_id = ctx.get_node_id()
        self.role = role

    def info(self):
        return {"role": self.role, "addr": self.addr, "node_id": self.node_id, "pid": self.proc.pid,
                "host_pid": os.getpid(),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}

    def stop(self):
        self.proc.kill()
        self.proc.wait()


# Ship ActorHost by value: Ray workers then need neither this package nor torch to host an actor
# (as `python -m rlrun.cluster`, this module is __main__, which Ray ships by value anyway).
if __name__ != "__main__":
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_json(path, obj):
    """Writes `obj` to `path` atomically (readers see the old or the new file, never half)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Watcher(threading.Thread):
    """Keeps the generators' addresses file current: when Ray restarts a generator host (its
    node died), the new `rlrun actor` listens elsewhere; the controller's pool re-reads the file."""

    def __init__(self, hosts, addrs, path):
        super().__init__(daemon=True)
        self.hosts, self.addrs, self.path = hosts, list(addrs), path
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.5):
            for i, h in enumerate(self.hosts):
                try:
                    info = ray.get(h.info.remote(), timeout=5)
                except Exception:
                    continue  # restarting, or not yet answering: ask again
                if info["addr"] != self.addrs[i]:
                    self.addrs[i] = info["addr"]
                    write_json(self.path, self.addrs)
                    print("RESTARTED " + json.dumps(dict(info, index=i)), flush=True)


def auto_backend(trainer, generators, trainer_gpus, generator_gpus):
    """`sync.backend = "auto"` on a cluster: shared memory when every generator is on the
    trainer's node (by Ray node id, not IP: fake nodes share one IP, and /dev/shm with it), else
    an NCCL broadcast when trainer and generators are on GPUs, else pulls over the network."""
    if all(g["node_id"] == trainer["node_id"] for g in generators):
        return "shm"
    return "nccl" if trainer_gpus > 0 and generator_gpus > 0 else "net"


def free_address():
    """host:port free on this node a moment ago (a data-parallel trainer's rendezvous)."""
    import socket as _socket

    import ray as _ray

    ip = _ray.util.get_node_ip_address()
    with _socket.socket() as s:
        s.bind((ip, 0))
        return f"{ip}:{s.getsockname()[1]}"


def start_hosts(exe, role, pg, group, configs, token, restarts):
    """One host per bundle of `pg`, the i-th running `configs[i]`."""
    host = ray.remote(ActorHost)
    hosts = []
    for i, config in enumerate(configs):
        opts = {"num_cpus": float(group["cpus"]), "num_gpus": float(group["gpus"]),
                "max_restarts": restarts,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=i)}
        hosts.append(host.options(**opts).remote(exe, role, config, token))
    return hosts


def latest_unfinished(cfg):
    """The newest run directory of this recipe's name whose last checkpoint is before its last
    step, or None."""
    base, name, steps = cfg["logging"]["run_dir"], cfg["name"], int(cfg["steps"])
    if not os.path.isdir(base):
        return None
    found = []
    for d in os.listdir(base):
        ckpts = os.path.join(base, d, "checkpoints")
        if not (d.startswith(f"{name}-") and os.path.isdir(ckpts)):
            continue
        done = [int(c[len("step-"):]) for c in os.listdir(ckpts)
                if c.startswith("step-") and c[len("step-"):].isdigit()]
        if done and max(done) < steps:
            found.append((os.path.getmtime(os.path.join(base, d)), os.path.join(base, d)))
    return max(found)[1] if found else None


def run(recipe, sets, report=None):
    """Runs `recipe` on the Ray cluster (or continues its newest unfinished run, with
    `cluster.resume_latest`); returns the controller's exit status."""
    exe = rlrun_exe()
    cfg = resolved(exe, recipe, sets)
    cl = cfg["cluster"]
    resume_dir = latest_unfinished(cfg) if cl.get("resume_latest") else None
    if resume_dir:
        print(f"resuming {resume_dir}", file=sys.stderr, flush=True)
    if cl["engine"] != "ray":
        raise RuntimeError(f"{recipe}: cluster.engine is {cl['engine']!r}, not \"ray\"")
    address = cl.get("address") or os.environ.get("RAY_ADDRESS") or "auto"
    node_ip = os.environ.get("RLRUN_NODE_IP")
    if node_ip:
        pin_node_ip(node_ip)
    ray.init(address=address, _node_ip_address=node_ip, logging_level="WARNING")
    timeout = float(cl["reserve_timeout_s"])
    tmp = tempfile.mkdtemp(prefix="rlrun-cluster-")
    pgs, hosts = [], []
    try:
        token_file = (cfg.get("placement", {}).get("token_file")
                      or os.environ.get("RLRUN_TOKEN_FILE"))
        if token_file:
            token = open(token_file).read().strip()
        else:
            token, token_file = secrets.token_hex(24), os.path.join(tmp, "token")
            fd = os.open(token_file, os.O_WRONLY | os.O_CREAT, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(token)
        # One bundle per data-parallel trainer rank, one per generator.
        world, n = int(cl["trainer"]["replicas"]), int(cl["generators"]["replicas"])
        deadline = time.time() + timeout
        trainer_pg = reserve("trainer", cl["trainer"], world, deadline, timeout)
        pgs.append(trainer_pg)
        rollout_pg = reserve("generators", cl["generators"], n, deadline, timeout)
        pgs.append(rollout_pg)
        # Settings as the controller will see them: a trainer and generators by address.
        placed = sets + ['placement.trainer_process=false', 'placement.generator_processes=0',
                         f'placement.trainer_addresses={json.dumps(["pending"] * world)}',
                         'placement.generator_addresses=["pending"]']

        def actor_config(role, gpus, rank=None, rendezvous=None):
            args = [exe, "cluster", "actor-config", recipe, "--role", role, *set_args(placed)]
            if gpus:
                args.append("--cuda")
            if rank is not None:
                args += ["--rank", str(rank), "--world", str(world), "--rendezvous", rendezvous]
            return subprocess.run(args, check=True, capture_output=True, text=True).stdout

        if world > 1:
            # Data parallel: rank 0 listens for the others on a free port of its node, found by
            # a task on its bundle.
            rendezvous = ray.get(ray.remote(free_address).options(
                num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=trainer_pg, placement_group_bundle_index=0)).remote())
            configs = [actor_config("trainer", cl["trainer"]["gpus"], r, rendezvous)
                       for r in range(world)]
        else:
            configs = [actor_config("trainer", cl["trainer"]["gpus"])]
        trainer = start_hosts(exe, "trainer", trainer_pg, cl["trainer"], configs, token,
                              restarts=0)
        gen_config = actor_config("generator", cl["generators"]["gpus"])
        gens = start_hosts(exe, "generator", rollout_pg, cl["generators"], [gen_config] * n,
                           token, restarts=-1)
        hosts = trainer + gens
        infos = ray.get([h.info.remote() for h in hosts])
        t_infos, g_infos = infos[:world], infos[world:]
        t_info = t_infos[0]
        backend = cfg["sync"]["backend"]
        if backend == "auto":
            backend = auto_backend(t_info, g_infos, cl["trainer"]["gpus"],
                                   cl["generators"]["gpus"])
        labels = {node["NodeID"]: node.get("Labels") or {} for node in ray.nodes()}
        placement = {
            "sync_backend": backend,
            "actors": [dict(i, node_labels=labels.get(i["node_id"], {})) for i in infos],
        }
        print("PLACEMENT " + json.dumps(placement), flush=True)
        if report:
            with open(report, "w") as f:
                json.dump(placement, f, indent=1)
        addresses = os.path.join(tmp, "generators.json")
        write_json(addresses, [g["addr"] for g in g_infos])
        watcher = Watcher(gens, [g["addr"] for g in g_infos], addresses)
        watcher.start()
        # A resumed run keeps its own recipe: only where the actors are may change.
        head, given = ([exe, "resume", resume_dir], []) if resume_dir else ([exe, recipe], sets)
        controller = [*head, *set_args(given + [
            'cluster.engine="local"',
            "placement.trainer_process=false",
            "placement.generator_processes=0",
            "placement.generator_addresses=[]",
            f'placement.trainer_addresses={json.dumps([t["addr"] for t in t_infos])}',
            f'placement.generator_addresses_file="{addresses}"',
            f'placement.token_file="{token_file}"',
            f'sync.backend="{backend}"',
        ])]
        try:
            return subprocess.run(controller).returncode
        finally:
            watcher.done.set()
    finally:
        for h in hosts:
            try:
                ray.get(h.stop.remote(), timeout=10)
            except Exception:
                pass
            ray.kill(h)
        for pg in pgs:
            remove_placement_group(pg)
        shutil.rmtree(tmp, ignore_errors=True)
        ray.shutdown()


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m rlrun.cluster", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a recipe on a Ray cluster")
    r.add_argument("recipe")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    r.add_argument("--report", help="write where each actor was placed (JSON) here")
    a = p.parse_args(argv)
    try:
        return run(a.recipe, a.set, a.report)
    except (ReservationError, RuntimeError, subprocess.CalledProcessError) as e:
        msg = e.stderr if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
        print(f"error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
