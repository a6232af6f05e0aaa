//! `[cluster]`: where a run's actors go beyond one machine, and the Kubernetes manifests of a run.
//!
//! With `engine = "ray"`, `rlrun recipe.toml` hands the run to the Python driver
//! (`python -m rlrun.cluster run recipe.toml`), which reserves the trainer and generator groups
//! with Ray placement groups and starts each `rlrun actor` process inside a Ray actor on its
//! bundle. `rlrun deploy kubernetes recipe.toml` writes what runs that on Kubernetes: a KubeRay
//! `RayJob` (a head with no work, a trainer and a rollout worker group), the recipe as a
//! `ConfigMap`, the run's token as a `Secret`, and Kueue's queue and priority labels with example
//! `WorkloadPriorityClass`es. `scripts/validate_manifests.py` checks them against the upstream
//! schemas offline.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::error::{Error, IoContext, Result};
use crate::Recipe;

/// `cluster.engine`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClusterEngine {
    /// Everything on this machine, placed by `[placement]`.
    #[default]
    Local,
    /// Trainer and generator groups reserved and placed on a Ray cluster.
    Ray,
}

/// How a group's bundles spread over nodes (Ray placement-group strategies).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    #[default]
    Pack,
    Spread,
    StrictPack,
    StrictSpread,
}

impl Strategy {
    pub fn ray_name(self) -> &'static str {
        match self {
            Strategy::Pack => "PACK",
            Strategy::Spread => "SPREAD",
            Strategy::StrictPack => "STRICT_PACK",
            Strategy::StrictSpread => "STRICT_SPREAD",
        }
    }
}

/// `[cluster]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterSection {
    pub engine: ClusterEngine,
    /// Ray: the cluster to join (`ray.init(address=...)`); empty: `RAY_ADDRESS`, else `auto`.
    pub address: String,
    /// Ray: a reservation not met within this many seconds fails, naming what is missing.
    pub reserve_timeout_s: f64,
    /// Ray: continue the newest unfinished run of this recipe's name under `logging.run_dir`
    /// (one with a checkpoint before the last step) instead of starting a new one; the
    /// Kubernetes manifests set it, so that a re-submitted job resumes from the shared volume.
    pub resume_latest: bool,
    pub trainer: GroupSpec,
    pub generators: GroupSpec,
    pub kubernetes: KubernetesSection,
}

impl Default for ClusterSection {
    fn default() -> Self {
        ClusterSection {
            engine: ClusterEngine::Local,
            address: String::new(),
            reserve_timeout_s: 300.0,
            resume_latest: false,
            trainer: GroupSpec::default(),
            generators: GroupSpec {
                strategy: Strategy::Pack,
                ..GroupSpec::default()
            },
            kubernetes: KubernetesSection::default(),
        }
    }
}

/// `[cluster.trainer]` / `[cluster.generators]`: one bundle per replica. Generators: one process
/// and one Kubernetes pod each. Trainer: one data-parallel rank each, all in one gang
/// (`strict-pack`: one node, one pod holding every rank's resources).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GroupSpec {
    /// Bundles: one per generator; one per data-parallel trainer rank.
    pub replicas: u32,
    pub gpus: u32,
    pub cpus: u32,
    pub memory_gb: f64,
    /// Ray node labels every bundle of the group must match (`bundle_label_selector`); the
    /// Kubernetes manifest gives the group's Ray nodes these labels.
    pub labels: BTreeMap<String, String>,
    /// Kubernetes node labels for the group's pods (`nodeSelector`, e.g. a GPU node pool).
    pub node_selector: BTreeMap<String, String>,
    /// Ray placement strategy of the group's bundles (the trainer is always `strict-pack`).
    pub strategy: Strategy,
}

impl Default for GroupSpec {
    fn default() -> Self {
        GroupSpec {
            replicas: 1,
            gpus: 0,
            cpus: 1,
            memory_gb: 4.0,
            labels: BTreeMap::new(),
            node_selector: BTreeMap::new(),
            strategy: Strategy::StrictPack,
        }
    }
}

/// `[cluster.kubernetes]`: what `rlrun deploy kubernetes` writes.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesSection {
    /// Name of the RayJob and prefix of the other objects (default: the recipe's `name`).
    pub name: String,
    pub namespace: String,
    /// Container image with `rlrun`, its Python package and the model (or the model on `run_claim`).
    pub image: String,
    /// Kueue LocalQueue; empty: no Kueue labels, the job starts at once.
    pub queue: String,
    /// Kueue WorkloadPriorityClass (`rlrun-production` and `rlrun-experiment` are written as
    /// examples).
    pub priority: String,
    /// PersistentVolumeClaim (ReadWriteMany) holding the run directory, so a re-run resumes.
    pub run_claim: String,
    pub run_mount: String,
    /// Size of the memory-backed `/dev/shm` of every pod.
    pub shm_gb: f64,
    /// An existing Secret with the run's token (key `token`); empty: one is written.
    pub token_secret: String,
    pub head_cpus: u32,
    pub head_memory_gb: f64,
}

impl Default for KubernetesSection {
    fn default() -> Self {
        KubernetesSection {
            name: String::new(),
            namespace: "default".into(),
            image: format!("rlrun:{}", env!("CARGO_PKG_VERSION")),
            queue: String::new(),
            priority: "rlrun-experiment".into(),
            run_claim: "rlrun-runs".into(),
            run_mount: "/runs".into(),
            shm_gb: 16.0,
            token_secret: String::new(),
            head_cpus: 2,
            head_memory_gb: 8.0,
        }
    }
}

/// The Ray version the manifests and the driver are made for (pinned in requirements.txt).
pub const RAY_VERSION: &str = "2.60.0";

/// Problems with `[cluster]` that its types cannot express: `(key, message)`.
pub fn check(c: &ClusterSection) -> std::result::Result<(), (String, String)> {
    let bad = |k: &str, m: &str| Err((format!("cluster.{k}"), m.to_string()));
    if c.reserve_timeout_s.is_nan() || c.reserve_timeout_s <= 0.0 {
        return bad("reserve_timeout_s", "must be positive");
    }
    for (name, g) in [("trainer", &c.trainer), ("generators", &c.generators)] {
        if g.replicas == 0 {
            return bad(&format!("{name}.replicas"), "must be at least 1");
        }
        if g.memory_gb.is_nan() || g.memory_gb <= 0.0 {
            return bad(&format!("{name}.memory_gb"), "must be positive");
        }
    }
    let k = &c.kubernetes;
    let dns = |s: &str| {
        !s.is_empty()
            && s.len() <= 52
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !s.starts_with('-')
            && !s.ends_with('-')
    };
    if !k.name.is_empty() && !dns(&k.name) {
        return bad(
            "kubernetes.name",
            "must be at most 52 lowercase letters, digits and '-', not starting or ending with '-'",
        );
    }
    if !dns(&k.namespace) {
        return bad("kubernetes.namespace", "must be a DNS label");
    }
    if !k.run_mount.starts_with('/') {
        return bad("kubernetes.run_mount", "must be an absolute path");
    }
    Ok(())
}

fn quantity_gb(gb: f64) -> String {
    format!("{}Mi", (gb * 1024.0).round() as u64)
}

/// Labels of a group's Ray nodes that the driver selects bundles by.
pub fn group_label(group: &str) -> (String, String) {
    ("rlrun.io/group".into(), group.into())
}

/// The manifests for `recipe` (whose text, as given, goes into a ConfigMap): `(file name,
/// object)` in the order to apply them.
pub fn kubernetes_manifests(recipe: &Recipe, text: &str) -> Result<Vec<(String, Value)>> {
    let c = &recipe.config.cluster;
    let k = &c.kubernetes;
    let name = if k.name.is_empty() {
        recipe.config.name.to_lowercase().replace(['_', '.'], "-")
    } else {
        k.name.clone()
    };
    let ns = &k.namespace;
    let labels = json!({"app.kubernetes.io/name": "rlrun", "app.kubernetes.io/instance": name});
    let secret = if k.token_secret.is_empty() {
        format!("{name}-token")
    } else {
        k.token_secret.clone()
    };
    let mut out = Vec::new();

    for (class, value, what) in [
        (
            "rlrun-production",
            1000,
            "Production training runs: admitted first, may preempt experiments.",
        ),
        (
            "rlrun-experiment",
            100,
            "Experiments: run when quota is free, preempted by production runs.",
        ),
    ] {
        out.push((
            format!("priority-{class}.yaml"),
            json!({
                "apiVersion": "kueue.x-k8s.io/v1beta2",
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": class},
                "value": value,
                "description": what,
            }),
        ));
    }
    if k.token_secret.is_empty() {
        out.push((
            "secret.yaml".into(),
            json!({
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": secret, "namespace": ns, "labels": labels},
                "type": "Opaque",
                "stringData": {"token": random_token()?},
            }),
        ));
    }
    out.push((
        "configmap.yaml".into(),
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": format!("{name}-recipe"), "namespace": ns, "labels": labels},
            "data": {"recipe.toml": text},
        }),
    ));

    let mounts = json!([
        {"name": "dshm", "mountPath": "/dev/shm"},
        {"name": "runs", "mountPath": k.run_mount},
        {"name": "recipe", "mountPath": "/etc/rlrun/recipe", "readOnly": true},
        {"name": "token", "mountPath": "/etc/rlrun/token", "readOnly": true},
    ]);
    let volumes = json!([
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": quantity_gb(k.shm_gb)}},
        {"name": "runs", "persistentVolumeClaim": {"claimName": k.run_claim}},
        {"name": "recipe", "configMap": {"name": format!("{name}-recipe")}},
        {"name": "token", "secret": {"secretName": secret}},
    ]);
    let env = json!([
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "RLRUN_TOKEN_FILE", "value": "/etc/rlrun/token/token"},
    ]);
    let pod = |container: &str,
               cpus: u32,
               memory_gb: f64,
               gpus: u32,
               selector: &BTreeMap<String, String>| {
        let mut res = json!({"cpu": cpus.to_string(), "memory": quantity_gb(memory_gb)});
        if gpus > 0 {
            res["nvidia.com/gpu"] = json!(gpus.to_string());
        }
        let mut spec = json!({
            "containers": [{
                "name": container,
                "image": k.image,
                "env": env,
                // Requests equal limits: GPUs cannot be overcommitted, and Kueue counts requests.
                "resources": {"requests": res, "limits": res},
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        });
        if !selector.is_empty() {
            spec["nodeSelector"] = json!(selector);
        }
        json!({"metadata": {"labels": labels}, "spec": spec})
    };
    // `pods` pods, each with `per_pod` bundles' resources.
    let group = |name: &str, g: &GroupSpec, pods: u32, per_pod: u32| {
        let mut ray_labels: BTreeMap<String, String> = g.labels.clone();
        let (key, value) = group_label(name);
        ray_labels.insert(key, value);
        let (cpus, gpus) = (g.cpus * per_pod, g.gpus * per_pod);
        let memory = g.memory_gb * f64::from(per_pod);
        json!({
            "groupName": name,
            "replicas": pods,
            "minReplicas": pods,
            "maxReplicas": pods,
            "rayStartParams": {},
            "labels": ray_labels,
            "template": pod("ray-worker", cpus, memory, gpus, &g.node_selector),
        })
    };
    let recipe_path = format!(
        "/etc/rlrun/recipe/recipe.toml --set logging.run_dir=\"{}\"",
        k.run_mount
    );
    let mut job_labels = labels.clone();
    let kueue = !k.queue.is_empty();
    if kueue {
        job_labels["kueue.x-k8s.io/queue-name"] = json!(k.queue);
        job_labels["kueue.x-k8s.io/priority-class"] = json!(k.priority);
    }
    out.push((
        "rayjob.yaml".into(),
        json!({
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "metadata": {"name": name, "namespace": ns, "labels": job_labels},
            "spec": {
                "entrypoint": format!("python -m rlrun.cluster run {recipe_path}"),
                // Kueue admits the job as a whole by unsuspending it; KubeRay requires
                // shutdownAfterJobFinishes for a job Kueue manages.
                "suspend": kueue,
                "shutdownAfterJobFinishes": true,
                "ttlSecondsAfterFinished": 600,
                "rayClusterSpec": {
                    "rayVersion": RAY_VERSION,
                    "headGroupSpec": {
                        // The head runs the driver and Ray's control plane, no actors.
                        "rayStartParams": {"num-cpus": "0"},
                        "template": pod("ray-head", k.head_cpus, k.head_memory_gb, 0, &BTreeMap::new()),
                    },
                    // The trainer's ranks are one gang on one node; each generator its own pod.
                    "workerGroupSpecs": [
                        group("trainer", &c.trainer, 1, c.trainer.replicas),
                        group("rollout", &c.generators, c.generators.replicas, 1),
                    ],
                },
            },
        }),
    ));
    Ok(out)
}

/// `rlrun recipe.toml` with `cluster.engine = "ray"`: the run is the Python driver's
/// (`python -m rlrun.cluster run`, from the venv of `RLRUN_PYTHON`, `.venv`, or `python3`), which
/// reserves the groups, starts the actors and then runs this binary as the controller.
pub fn run_on_ray(recipe: &Path, set: &[String]) -> anyhow::Result<()> {
    let python = crate::python();
    let mut cmd = std::process::Command::new(&python);
    cmd.args(["-m", "rlrun.cluster", "run"]).arg(recipe);
    for s in set {
        cmd.arg("--set").arg(s);
    }
    // The driver starts actors and the controller with this very binary.
    if std::env::var_os("RLRUN_EXE").is_none() {
        cmd.env("RLRUN_EXE", crate::actors::rlrun_exe()?);
    }
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("running the Ray driver with {}: {e}", python.display()))?;
    if !status.success() {
        anyhow::bail!("the Ray driver failed ({status})");
    }
    Ok(())
}

fn random_token() -> Result<String> {
    let mut b = [0u8; 24];
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .at("/dev/urandom")?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// `rlrun deploy kubernetes`: writes the manifests into `out`; returns their paths.
pub fn write_kubernetes(recipe_path: &Path, set: &[String], out: &Path) -> Result<Vec<PathBuf>> {
    let recipe = Recipe::load(recipe_path, set)?;
    // The pods read the resolved recipe (overrides applied), not the file as given, set to run on
    // Ray with each group pinned to its worker group's Ray nodes.
    let mut config = recipe.config.clone();
    config.cluster.engine = ClusterEngine::Ray;
    config.cluster.resume_latest = true;
    for (name, g) in [
        ("trainer", &mut config.cluster.trainer),
        ("rollout", &mut config.cluster.generators),
    ] {
        let (k, v) = group_label(name);
        g.labels.insert(k, v);
    }
    let text = toml::to_string_pretty(&config)
        .map_err(|e| Error::Usage(format!("writing the recipe for the ConfigMap: {e}")))?;
    let manifests = kubernetes_manifests(&recipe, &text)?;
    std::fs::create_dir_all(out).at(out)?;
    let mut paths = Vec::new();
    for (file, v) in manifests {
        let p = out.join(file);
        std::fs::write(&p, to_yaml(&v)).at(&p)?;
        paths.push(p);
    }
    Ok(paths)
}

/// YAML for a JSON value: block style, every string double-quoted (a JSON string is a YAML
/// double-quoted scalar), so nothing is read back as another type.
pub fn to_yaml(v: &Value) -> String {
    let mut s = String::new();
    emit(v, 0, &mut s);
    s
}

/// A mapping key: plain when it cannot be read as anything but that string, else quoted.
fn yaml_key(k: &str) -> String {
    let plain = k
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || "_./-".contains(c))
        && !matches!(
            k.to_ascii_lowercase().as_str(),
            "y" | "n" | "yes" | "no" | "true" | "false" | "on" | "off" | "null"
        );
    if plain {
        k.to_string()
    } else {
        Value::String(k.to_string()).to_string()
    }
}

fn scalar(v: &Value) -> String {
    match v {
        Value::String(_) | Value::Number(_) | Value::Bool(_) | Value::Null => v.to_string(),
        Value::Array(a) if a.is_empty() => "[]".into(),
        Value::Object(o) if o.is_empty() => "{}".into(),
        _ => unreachable!("a collection is not a scalar"),
    }
}

fn is_block(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty()) || matches!(v, Value::Object(o) if !o.is_empty())
}

fn emit(v: &Value, indent: usize, s: &mut String) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(o) => {
            for (k, x) in o {
                let key = yaml_key(k);
                if is_block(x) {
                    s.push_str(&format!("{pad}{key}:\n"));
                    emit(x, indent + 2, s);
                } else {
                    s.push_str(&format!("{pad}{key}: {}\n", scalar(x)));
                }
            }
        }
        Value::Array(a) => {
            for x in a {
                if is_block(x) {
                    // The first line of the item goes after "- ", the rest indented under it.
                    let mut inner = String::new();
                    emit(x, indent + 2, &mut inner);
                    let rest = inner.trim_start_matches(' ');
                    s.push_str(&format!("{pad}- {rest}"));
                } else {
                    s.push_str(&format!("{pad}- {}\n", scalar(x)));
                }
            }
        }
        other => s.push_str(&format!("{pad}{}\n", scalar(other))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_quotes_every_string_and_nests_blocks() {
        let v = json!({"a": "yes", "b": [1, {"c": "0", "d": []}, ["x"]], "e": {}, "f": "multi\nline",
            "on": true, "nvidia.com/gpu": "1", "a key": null});
        let y = to_yaml(&v);
        assert_eq!(
            y,
            "a: \"yes\"\nb:\n  - 1\n  - c: \"0\"\n    d: []\n  - - \"x\"\ne: {}\nf: \"multi\\nline\"\n\"on\": true\nnvidia.com/gpu: \"1\"\n\"a key\": null\n"
        );
    }
}
