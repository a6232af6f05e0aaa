//! `rlrun`: reinforcement-learning post-training for LLMs.
//!
//! ```text
//! rlrun <recipe.toml> [--set key=value]...   train
//! rlrun check <recipe.toml> [--set ...]      validate and print the resolved recipe
//! rlrun resume <run-dir>                     continue a run from its last checkpoint
//! rlrun model import <file.gguf> <dir>   convert a GGUF model to a Hugging Face directory
//! rlrun model info <path>                print a model's config and parameter count
//! rlrun chat <model> "<message>"         greedy chat completion (a quick check of a model)
//! rlrun bench <what>                     benchmarks with the peer measured in the same run
//! rlrun deploy kubernetes <recipe.toml>  KubeRay RayJob + Kueue manifests from [cluster]
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod bench_memory;
mod cli_model;
mod selftest;

use rlrun::{Recipe, Run};

#[derive(Parser)]
#[command(
    name = "rlrun",
    version,
    about = "Reinforcement-learning post-training for LLMs on libtorch",
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    /// A recipe to train (see recipes/).
    recipe: Option<PathBuf>,
    /// Override a recipe value: --set trainer.lr=1e-6 (TOML value; strings need no quotes).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Validate a recipe and print it resolved (defaults filled in, overrides applied).
    Check {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Continue a run from its latest checkpoint (`--set placement.*=...` moves it, e.g. to
    /// another data-parallel world size; memory settings such as trainer.micro_batch_tokens may
    /// change too).
    Resume {
        run_dir: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Evaluate a recipe's model on its held-out set (greedy), printing a few completions.
    Eval {
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Completions to print.
        #[arg(long, default_value_t = 5)]
        show: usize,
    },
    /// Model utilities.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Greedy chat completion of one user message.
    Chat {
        /// Model directory or .gguf file.
        model: PathBuf,
        message: String,
        #[arg(long, default_value_t = 128)]
        max_tokens: usize,
        #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
        device: DeviceArg,
    },
    /// Checks of the GPU code paths (run by scripts/device-check.sh on a CUDA machine).
    Selftest {
        /// Directory of the test fixtures (tiny models with transformers references).
        #[arg(long, default_value = ".fixtures")]
        fixtures: PathBuf,
        /// SmolLM2-135M-Instruct directory, for the log-prob mismatch and trainer checks.
        #[arg(long)]
        smollm2: Option<PathBuf>,
        /// Write the report as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
    /// Serve one actor (generator or trainer) over gRPC; `rlrun` spawns these itself, or start one
    /// by hand and name its address in the recipe ([placement] generator_addresses).
    Actor {
        #[arg(value_enum)]
        role: rlrun::actors::Role,
        /// Address to listen on (host:port; port 0 picks a free one). Anything but loopback
        /// requires --token-file.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: String,
        /// File holding the shared token that clients must present.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// JSON actor config (model, dtype, device, engine / trainer settings).
        #[arg(long)]
        config: PathBuf,
        /// Exit when the process that started this one exits (set by `rlrun` for its children).
        #[arg(long)]
        exit_with_parent: bool,
    },
    /// Write what runs a recipe elsewhere: `rlrun deploy kubernetes recipe.toml` writes a KubeRay
    /// RayJob with Kueue labels (and its Secret, ConfigMap and example priority classes) from
    /// the recipe's [cluster] section.
    Deploy {
        #[arg(value_enum)]
        target: DeployTarget,
        recipe: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        /// Directory for the manifests.
        #[arg(long, default_value = "deploy/out")]
        out: PathBuf,
    },
    /// What a launcher needs (the Ray driver): `rlrun cluster actor-config <recipe> --role R`
    /// prints the JSON config of that actor's process.
    #[command(hide = true)]
    Cluster {
        #[arg(value_enum)]
        what: ClusterQuery,
        recipe: PathBuf,
        #[arg(long, value_enum)]
        role: rlrun::actors::Role,
        /// The process will see its own GPU (CUDA_VISIBLE_DEVICES set by its launcher).
        #[arg(long)]
        cuda: bool,
        /// A data-parallel trainer rank: `--rank R --world N --rendezvous host:port` (rank 0
        /// listens there for the others).
        #[arg(long, requires_all = ["world", "rendezvous"])]
        rank: Option<usize>,
        #[arg(long)]
        world: Option<usize>,
        #[arg(long)]
        rendezvous: Option<String>,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
    },
    /// Benchmarks that measure the peer (transformers / PyTorch) in the same run and print ratios.
    Bench {
        #[command(subcommand)]
        what: bench::BenchCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Convert a GGUF file into a Hugging Face directory (safetensors + config + tokenizer).
    Import {
        gguf: PathBuf,
        out: PathBuf,
        #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
        dtype: DtypeArg,
    },
    /// Print a model's architecture and parameter count.
    Info { path: PathBuf },
}

#[derive(Clone, Copy, ValueEnum)]
enum ClusterQuery {
    ActorConfig,
}

#[derive(Clone, Copy, ValueEnum)]
enum DeployTarget {
    Kubernetes,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DtypeArg {
    F32,
    Bf16,
    F16,
}

impl DtypeArg {
    pub fn kind(self) -> tch::Kind {
        match self {
            DtypeArg::F32 => tch::Kind::Float,
            DtypeArg::Bf16 => tch::Kind::BFloat16,
            DtypeArg::F16 => tch::Kind::Half,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum DeviceArg {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    pub fn device(self) -> tch::Device {
        match self {
            DeviceArg::Cpu => tch::Device::Cpu,
            DeviceArg::Cuda => tch::Device::Cuda(0),
            DeviceArg::Auto => tch::Device::cuda_if_available(),
        }
    }
}

fn train(mut run: Run) -> anyhow::Result<()> {
    rlrun::controller::install_ctrl_c();
    eprintln!("run directory: {}", run.run_dir.display());
    let summary = match run.train(true) {
        Ok(s) => s,
        Err(e) => {
            if let Ok(Some(ckpt)) = rlrun::controller::latest_checkpoint(&run.run_dir) {
                eprintln!(
                    "the run stopped on an error; its last checkpoint is {}: continue with `rlrun resume {}`",
                    ckpt.display(),
                    run.run_dir.display()
                );
            }
            return Err(e.into());
        }
    };
    let pct = |e: &Option<rlrun::EvalResult>| e.as_ref().map(accuracy_text);
    if let Some(b) = pct(&summary.before) {
        println!("held-out accuracy before training: {b}");
    }
    if let Some(a) = pct(&summary.after) {
        println!("held-out accuracy after training:  {a}");
    }
    if let (Some(b), Some(a)) = (&summary.before, &summary.after) {
        if let Some((gain, lo, hi)) = rlrun::controller::paired_gain(b, a) {
            println!(
                "held-out gain: {:+.1} points (95% interval {:+.1} to {:+.1}, paired over the same {} problems)",
                100.0 * gain,
                100.0 * lo,
                100.0 * hi,
                a.problems
            );
        }
    }
    if let (Some(b), Some(a)) = (
        summary
            .before
            .as_ref()
            .and_then(|e| e.tool_calls_per_episode),
        summary
            .after
            .as_ref()
            .and_then(|e| e.tool_calls_per_episode),
    ) {
        println!("tool calls per held-out episode: {b:.2} before, {a:.2} after");
    }
    if summary.interrupted {
        println!(
            "interrupted at step {}: checkpoint written; continue with `rlrun resume {}`",
            summary.steps,
            run.run_dir.display()
        );
    }
    println!(
        "steps: {}, wall time: {:.0}s",
        summary.steps, summary.seconds
    );
    println!("{}", summary.memory);
    println!(
        "logs: {}/metrics.jsonl, TensorBoard: tensorboard --logdir {}/tensorboard",
        run.run_dir.display(),
        run.run_dir.display()
    );
    println!("checkpoint: {}", summary.checkpoint.display());
    Ok(())
}

/// `71.0% of 200 (95% interval 64.4-76.8%)`: an accuracy with its Wilson interval.
fn accuracy_text(e: &rlrun::EvalResult) -> String {
    let (lo, hi) = e.accuracy_interval();
    format!(
        "{:.1}% of {} (95% interval {:.1}-{:.1}%)",
        100.0 * e.accuracy,
        e.problems,
        100.0 * lo,
        100.0 * hi
    )
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Some(command) = cli.command else {
        let recipe = cli.recipe.context(
            "give a recipe (e.g. rlrun recipes/quickstart.toml) or a subcommand; see --help",
        )?;
        let loaded = Recipe::load(&recipe, &cli.set)?;
        if loaded.config.cluster.engine == rlrun::cluster::ClusterEngine::Ray {
            return rlrun::cluster::run_on_ray(&recipe, &cli.set);
        }
        return train(Run::create(loaded)?);
    };
    match command {
        Command::Check { recipe, set } => {
            let r = Recipe::load(&recipe, &set)?;
            println!("# {} is valid; resolved:", recipe.display());
            print!("{}", r.resolved);
            Ok(())
        }
        Command::Resume { run_dir, set } => train(Run::resume_with(&run_dir, &set)?),
        Command::Eval { recipe, set, show } => {
            let mut run = Run::create(Recipe::load(&recipe, &set)?)?;
            let e = run.evaluate()?;
            for (p, c, r) in run.last_eval_samples().iter().take(show) {
                println!("--- reward {r}\n{p}{c}");
            }
            println!(
                "held-out accuracy: {}; mean reward {:.3}, mean length {:.1} tokens, {:.1}s{}",
                accuracy_text(&e),
                e.mean_reward,
                e.mean_response_len,
                e.seconds,
                e.pass_at_k
                    .map(|p| format!(", pass@k {:.1}%", 100.0 * p))
                    .unwrap_or_default()
            );
            Ok(())
        }
        Command::Model(ModelCommand::Import { gguf, out, dtype }) => {
            rlrun_model::import_gguf(&gguf, &out, dtype.kind())
                .with_context(|| format!("importing {}", gguf.display()))?;
            println!("wrote {}", out.display());
            Ok(())
        }
        Command::Model(ModelCommand::Info { path }) => cli_model::info(&path),
        Command::Chat {
            model,
            message,
            max_tokens,
            device,
        } => cli_model::chat(&model, &message, max_tokens, device.device()),
        Command::Bench { what } => bench::run(what),
        Command::Cluster {
            what: ClusterQuery::ActorConfig,
            recipe,
            role,
            cuda,
            rank,
            world,
            rendezvous,
            set,
        } => {
            let r = Recipe::load(&recipe, &set)?;
            let dp = match (rank, world, rendezvous) {
                (Some(rank), Some(world), Some(rendezvous)) => Some(rlrun_trainer::DataParallel {
                    rank,
                    world,
                    rendezvous,
                }),
                _ => None,
            };
            let cfg = rlrun::controller::actor_config(&r, role, cuda, dp)?;
            println!("{}", serde_json::to_string(&cfg)?);
            Ok(())
        }
        Command::Deploy {
            target: DeployTarget::Kubernetes,
            recipe,
            set,
            out,
        } => {
            for p in rlrun::cluster::write_kubernetes(&recipe, &set, &out)? {
                println!("wrote {}", p.display());
            }
            println!(
                "apply with: kubectl apply -f {} (the priority classes once per cluster)",
                out.display()
            );
            Ok(())
        }
        Command::Actor {
            role,
            listen,
            token_file,
            config,
            exit_with_parent,
        } => {
            if exit_with_parent {
                rlrun::actors::exit_with_parent();
            }
            Ok(rlrun::actors::serve(
                role,
                &listen,
                token_file.as_deref(),
                &config,
            )?)
        }
        Command::Selftest {
            fixtures,
            smollm2,
            json,
        } => selftest::cuda(&fixtures, smollm2.as_deref(), json.as_deref()),
    }
}

fn main() -> ExitCode {
    rlrun::tune_allocator();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RLRUN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // Colours only on a terminal: a log redirected to a file stays plain text.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    // On CUDA, f32 matmuls (the logits projection of bf16 models, computed in f32) use TF32
    // tensor cores: exact for bf16-valued inputs, and ~8x faster than plain f32. Not for the
    // selftest, whose f32 parity check wants full-precision f32. Set the variable to 0 to opt out.
    if !matches!(cli.command, Some(Command::Selftest { .. }))
        && std::env::var_os("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE").is_none()
    {
        // SAFETY: single-threaded at this point (before any torch or tokio threads start).
        unsafe { std::env::set_var("TORCH_ALLOW_TF32_CUBLAS_OVERRIDE", "1") };
    }
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
