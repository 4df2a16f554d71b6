use std::process::ExitCode;
use std::time::Instant;

use devices::legacy::boot_timer::process_cpu_time_us;
use mote::cli::{Cli, Command, SnapshotCommand};
use mote::config::LoggerConfig;
use mote::startup_phases::StartupPhases;
use mote::{ApiOptions, Ended, ProcessStart};

/// glibc gives each thread that allocates its own malloc arena: a 64 MiB reservation, three
/// system calls in the thread's start and pages of its own. mote's threads allocate little and
/// seldom at once (the vCPUs hardly at all), so one arena serves them all.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets a malloc tunable; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// The last log line, in Firecracker's words with mote's name, so that tools can match it:
/// `mote exiting successfully. exit_code=0`, or `mote exiting with error. exit_code=N`.
fn log_exit(code: u8) {
    if code == 0 {
        log::info!("mote exiting successfully. exit_code=0");
    } else {
        log::error!("mote exiting with error. exit_code={code}");
    }
}

fn main() -> ExitCode {
    let mut phases = StartupPhases::begin();
    let start = ProcessStart {
        instant: Instant::now(),
        cpu_us: process_cpu_time_us(),
    };
    one_malloc_arena();
    // Before any thread starts, so that every thread inherits it.
    if let Err(err) = mote::signals::count_write_error_signals() {
        eprintln!("mote: cannot catch SIGXFSZ and SIGPIPE: {err}");
        return ExitCode::FAILURE;
    }
    let cli = Cli::parse_checked();
    phases.mark("arguments");
    // Questions about snapshots are answered before anything starts, as Firecracker does.
    if cli.top.snapshot_version {
        println!("v{}", mote::cli::SNAPSHOT_VERSION);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.top.describe_snapshot {
        return match mote::cli::snapshot_format_version(path) {
            Ok(version) => {
                println!("v{version}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("mote: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Snapshot(SnapshotCommand::Describe { path })) = &cli.command {
        return match mote::cli::describe_snapshot(path) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("mote: {err}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Snapshot(SnapshotCommand::Rebase { base, diff, output })) = &cli.command {
        return match mote::cli::rebase_snapshot(base, diff, output.as_deref()) {
            Ok(line) => {
                println!("{line}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("mote: {err}");
                ExitCode::FAILURE
            }
        };
    }
    // Firecracker logs to stdout until told otherwise; `mote run`'s stdout is the console.
    let log_destination = if cli.command.is_none() {
        mote::logger::Destination::Stdout
    } else {
        mote::logger::Destination::Stderr
    };
    mote::logger::init(&cli.top.id, cli.top.level, log_destination);
    phases.mark("logger");
    // The image store is managed before anything of a VM starts.
    if let Some(Command::Image(command)) = &cli.command {
        return match mote::image::commands::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("mote: {err}");
                ExitCode::FAILURE
            }
        };
    }
    // Chosen before any thread starts; each thread installs its filter itself.
    match mote::seccomp::SeccompFilters::load(&cli.seccomp()) {
        Ok(filters) => mote::seccomp::init(filters),
        Err(err) => {
            eprintln!("mote: {err}");
            return ExitCode::FAILURE;
        }
    }
    phases.mark("filters");

    // One panic model for every build (src/thread.rs): a panic on any thread puts the terminal
    // back (no destructor runs when the process aborts), prints its message and ends mote.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        mote::terminal::restore();
        default_hook(info);
        std::process::abort();
    }));

    let result = match &cli.command {
        Some(Command::Snapshot(_) | Command::Image(_)) => {
            unreachable!("answered before anything started")
        }
        Some(Command::Run(args)) => match (args.restore_params(), args.image_options()) {
            (Some(params), _) => {
                mote::run_restored(cli.top.id.clone(), &params, args.api_sock.as_deref(), start)
                    .map(Ended::from)
            }
            (None, Some(image)) => mote::run_image(&args.resources(), &image, start),
            (None, None) => mote::run_guest(&args.resources(), start).map(Ended::from),
        },
        None => {
            let api = &cli.top.api;
            // Its start and filter overlap the configuration below (another CPU's work); a
            // thread that cannot start now is tried again when the socket is made.
            let api_thread = (!api.no_api)
                .then(mote::api::ApiThread::spawn)
                .and_then(Result::ok);
            // Firecracker's flags configure the logger as PUT /logger would, with --level.
            let logger = (api.log_path.is_some() || api.module.is_some()).then(|| LoggerConfig {
                log_path: api.log_path.clone(),
                level: Some(cli.top.level.to_string()),
                show_level: Some(api.show_level),
                show_log_origin: Some(api.show_log_origin),
                module: api.module.clone(),
            });
            let options = ApiOptions {
                instance_id: cli.top.id.clone(),
                api_sock: (!api.no_api).then_some(api.api_sock.as_path()),
                max_payload: api.http_api_max_payload_size,
                mmds_size_limit: api.mmds_size_limit,
                config_file: api.config_file.as_deref(),
                boot_timer: api.boot_timer,
                logger,
                metrics_path: api.metrics_path.as_deref(),
                startup: api.startup_times(),
                phases,
                api_thread,
            };
            mote::run_api(options, start).map(Ended::from)
        }
    };
    match result {
        // The exit line first, so that a person reading stderr finds the reason last.
        Ok(outcome) => {
            log_exit(outcome.exit_code());
            if let Some(message) = outcome.message() {
                eprintln!("mote: {message}");
            }
            // The VM ran: leave its teardown in the host kernel to a reaper.
            mote::teardown::exit(outcome.exit_code())
        }
        Err(err) => {
            let code = err.exit_code();
            log_exit(code);
            eprintln!("mote: {err}");
            ExitCode::from(code)
        }
    }
}
