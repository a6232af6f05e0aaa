//! `rlrun`: reinforcement-learning post-training for LLMs.
//!
//! ```text
//! rlrun model import <file.gguf> <dir>   convert a GGUF model to a Hugging Face directory
//! rlrun model info <path>                print a model's config and parameter count
//! rlrun chat <model> "<message>"         greedy chat completion (a quick check of a model)
//! rlrun bench <what>                     benchmarks with the peer measured in the same run
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

mod bench;
mod cli_model;

#[derive(Parser)]
#[command(
    name = "rlrun",
    version,
    about = "Reinforcement-learning post-training for LLMs on libtorch"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
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
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RLRUN_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
