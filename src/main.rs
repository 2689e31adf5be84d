//! The `rewind` binary: parses the command line and hands each subcommand
//! to the library. This is the only place where errors become `anyhow`
//! and exit codes.

use clap::Parser;
use rewind::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    let code = match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rewind: error: {e:#}");
            1
        }
    };
    std::process::exit(code);
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run(_) | Command::Restore(_) | Command::Ls(_) | Command::Verify(_) => {
            anyhow::bail!("not implemented yet")
        }
    }
}
