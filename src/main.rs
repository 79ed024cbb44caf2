//! The `egressguard` binary: parse the command line, set up logging, call the library.

use std::process::ExitCode;

use clap::Parser;
use egressguard::cli::{self, Cli, Command, Exit};
use egressguard::{daemon, demo, logging};

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let exit = match &cli.command {
        Command::Run(args) => daemon::run(args),
        Command::Check(args) => cli::check::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Status(args) => cli::status::run(args),
        Command::List(args) => cli::list::run(args),
        Command::Show(args) => cli::show::run(args),
        Command::Block(args) => cli::block::run(args),
        Command::Unblock(args) => cli::unblock::run(args),
        Command::Reload(args) => cli::reload::run(args),
        Command::Breaker(cli::BreakerCommand::Reset(args)) => cli::breaker::reset(args),
        Command::GenerateMan { dir } => io_exit(cli::generate::man(dir)),
        Command::GenerateCompletions { dir } => io_exit(cli::generate::completions(dir)),
    };
    exit.into()
}

fn io_exit(r: std::io::Result<()>) -> Exit {
    match r {
        Ok(()) => Exit::Ok,
        Err(e) => {
            eprintln!("egressguard: {e}");
            Exit::Failure
        }
    }
}
