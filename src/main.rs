use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use devices::legacy::boot_timer::process_cpu_time_us;
use mote::cli::{Cli, Command};

fn main() -> ExitCode {
    let process_start = Instant::now();
    let process_start_cpu_us = process_cpu_time_us();
    let cli = Cli::parse();
    mote::logger::init(&cli.id, cli.level);

    // The release build aborts on panic, so no destructor would put the terminal back.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        mote::terminal::restore();
        default_hook(info);
    }));

    let result = match &cli.command {
        Command::Run(args) => {
            mote::run_guest(&args.resources(), process_start, process_start_cpu_us)
        }
    };
    match result {
        Ok(outcome) => {
            if let Some(message) = outcome.message() {
                eprintln!("mote: {message}");
            }
            ExitCode::from(outcome.exit_code())
        }
        Err(err) => {
            eprintln!("mote: {err}");
            ExitCode::FAILURE
        }
    }
}
