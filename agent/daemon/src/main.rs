//! `pier-agent`: the host daemon and its host-side tools. Parses arguments and hands off to
//! the library; every command's work lives in a module named for it.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "pier-agent",
    version,
    about = "pier host agent: validate bundles, deploy on this host, run the daemon"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check an AppSpec file, a bundle directory, or a bundle archive; report every problem.
    Validate {
        /// An appspec.yml, a bundle directory, or a .tar/.tar.gz/.tgz/.zip bundle.
        path: PathBuf,
        /// The AppSpec file name inside a bundle (default appspec.yml, then appspec.yaml).
        #[arg(short = 'A', long = "appspec-filename")]
        appspec_filename: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value = "text")]
        format: pier_agent::validate::Format,
    },
    /// Run one deployment on this host from a bundle (the flags of codedeploy-local).
    DeployLocal(pier_agent::deploy_local::Args),
    /// Run the agent: poll this host's queue and deploy what arrives, until SIGTERM.
    Run(pier_agent::daemon::Args),
    /// Check the agent configuration file and print what the agent would run with (exit 78
    /// and every problem when it is not valid). Run it before a restart or `systemctl reload`.
    CheckConfig {
        /// The configuration file.
        #[arg(short = 'c', long = "config", default_value = "/etc/pier/agent.yml")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    pier_transport::aws::disable_imds_off_ec2();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Validate {
            path,
            appspec_filename,
            format,
        } => {
            pier_sys::logging::init(log::LevelFilter::Warn);
            pier_agent::validate::run(&pier_agent::validate::Options {
                path,
                appspec_filename,
                format,
            })
        }
        Command::DeployLocal(args) => {
            pier_sys::logging::init(log::LevelFilter::Warn);
            pier_agent::deploy_local::run(&args)
        }
        Command::Run(args) => pier_agent::daemon::run(&args),
        Command::CheckConfig { config } => pier_agent::config::Config::check(&config),
    };
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
