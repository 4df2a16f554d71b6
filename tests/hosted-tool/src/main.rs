//! One static program for both sides of the emulated-host tests (tests/hosted.rs): inside a
//! guest it is the guest program that talks vsock, inside the emulated host it is the host
//! side (Unix sockets: mote's vsock socket and API); tools/bench aarch64-boot times monitors
//! with it in the emulated arm64 host (`time-to-line`). It has no dependencies, so the tests
//! build it in seconds for any target.
//!
//! ```text
//! hosted-tool vsock-connect CID PORT      a stream to CID:PORT on stdin/stdout
//! hosted-tool vsock-listen PORT [--echo]  accept on PORT: one stream on stdin/stdout, or
//!                                         echo every connection (in parallel) until killed
//! hosted-tool unix-connect PATH           a stream to the Unix socket PATH on stdin/stdout
//! hosted-tool unix-listen PATH [--echo]   accept on PATH, as vsock-listen
//! hosted-tool tcp-connect ADDR:PORT       a TCP stream on stdin/stdout
//! hosted-tool tcp-listen PORT [--echo]    accept TCP on PORT (any address), as vsock-listen
//! hosted-tool api SOCKET METHOD PATH [BODY]
//!                                         one HTTP request to mote's API; prints the status
//!                                         code and the body; exit 0 on a 2xx
//! hosted-tool time-to-line TEXT SECONDS COMMAND [ARG...]
//!                                         run COMMAND (stdin /dev/null, stderr ours), copy
//!                                         its stdout to ours, and time from just before the
//!                                         spawn to the first line holding TEXT and to its
//!                                         exit; then print `time-to-line: line-ms=M
//!                                         exit-ms=E status=S` on a line of its own
//!                                         (line-ms=none: no such line; status=timeout: killed
//!                                         after SECONDS); exit 0 when the line came and the
//!                                         command exited with 0
//! hosted-tool uffd-handler SOCKET MEMFILE
//!                                         a page-fault handler for mote's Uffd memory
//!                                         backend (tests/common/uffd_handler.rs): listen on
//!                                         SOCKET, serve one monitor's faults from the memory
//!                                         file MEMFILE until it hangs up, then print
//!                                         `uffd-handler: faults=F zero=Z removes=R`
//! ```
//! Listeners print `ready` on stderr once they accept connections. A stream copies stdin to
//! the socket (then half-closes it) and the socket to stdout, until both have ended.

mod sock;
// Shared with the probe-guest tests, whose in-process `spawn` this program does not use.
#[allow(dead_code)]
#[path = "../../common/uffd_handler.rs"]
mod uffd_handler;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sock::Stream;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match words.as_slice() {
        ["vsock-connect", cid, port] => {
            sock::vsock_connect(number(cid), number(port)).and_then(|s| pipe(Box::new(s)))
        }
        ["vsock-listen", port, rest @ ..] => {
            let listener = sock::vsock_listen(number(port));
            listener.and_then(|l| {
                serve(rest == ["--echo"], || {
                    l.accept().map(|s| Box::new(s) as Box<dyn Stream>)
                })
            })
        }
        ["unix-connect", path] => UnixStream::connect(path).and_then(|s| pipe(Box::new(s))),
        ["unix-listen", path, rest @ ..] => UnixListener::bind(path).and_then(|l| {
            serve(rest == ["--echo"], || {
                l.accept().map(|(s, _)| Box::new(s) as Box<dyn Stream>)
            })
        }),
        ["tcp-connect", address] => TcpStream::connect(address).and_then(|s| pipe(Box::new(s))),
        ["tcp-listen", port, rest @ ..] => TcpListener::bind(("0.0.0.0", number::<u16>(port)))
            .and_then(|l| {
                serve(rest == ["--echo"], || {
                    l.accept().map(|(s, _)| Box::new(s) as Box<dyn Stream>)
                })
            }),
        ["api", socket, method, path, body @ ..] => {
            return api(socket, method, path, body.first().copied())
        }
        ["time-to-line", text, seconds, program, args @ ..] => {
            return time_to_line(text, number(seconds), program, args)
        }
        ["uffd-handler", socket, mem_file] => UnixListener::bind(socket).and_then(|listener| {
            eprintln!("ready");
            let control = uffd_handler::Control::default();
            uffd_handler::serve(&listener, std::path::Path::new(mem_file), &control)?;
            let count =
                |n: &std::sync::atomic::AtomicU64| n.load(std::sync::atomic::Ordering::SeqCst);
            println!(
                "uffd-handler: faults={} zero={} removes={}",
                count(&control.faults),
                count(&control.zero_faults),
                count(&control.removes)
            );
            Ok(())
        }),
        _ => {
            eprintln!("usage: see the header of tests/hosted-tool/src/main.rs");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("hosted-tool: {err}");
            ExitCode::FAILURE
        }
    }
}

fn number<T: std::str::FromStr>(word: &str) -> T {
    word.parse().unwrap_or_else(|_| {
        eprintln!("hosted-tool: not a number: {word}");
        std::process::exit(2)
    })
}

/// Accepts connections: with `echo`, echoes each on its own thread forever; otherwise pipes the
/// first one to stdin/stdout and returns when it has ended.
fn serve(echo: bool, accept: impl Fn() -> std::io::Result<Box<dyn Stream>>) -> std::io::Result<()> {
    eprintln!("ready");
    if !echo {
        return pipe(accept()?);
    }
    loop {
        let stream = accept()?;
        std::thread::spawn(move || {
            let mut reader = stream.try_clone_box().expect("cannot clone a stream");
            let mut writer = stream;
            let _ = std::io::copy(&mut reader, &mut writer);
            let _ = writer.shutdown_write();
        });
    }
}

/// stdin to the stream (then a half-close), the stream to stdout, until both have ended.
fn pipe(stream: Box<dyn Stream>) -> std::io::Result<()> {
    let mut reader = stream.try_clone_box()?;
    let mut writer = stream;
    let sender = std::thread::spawn(move || -> std::io::Result<()> {
        std::io::copy(&mut std::io::stdin().lock(), &mut writer)?;
        writer.shutdown_write()
    });
    let mut stdout = std::io::stdout().lock();
    std::io::copy(&mut reader, &mut stdout)?;
    stdout.flush()?;
    sender.join().expect("the sending thread panicked")
}

fn api(socket: &str, method: &str, path: &str, body: Option<&str>) -> ExitCode {
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let mut answer = String::new();
    let sent = UnixStream::connect(socket).and_then(|mut s| {
        s.write_all(request.as_bytes())?;
        s.read_to_string(&mut answer)
    });
    if let Err(err) = sent {
        eprintln!("hosted-tool: {method} {path} on {socket}: {err}");
        return ExitCode::FAILURE;
    }
    let code = answer.split(' ').nth(1).unwrap_or("?").to_string();
    let content = answer.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    println!("{code} {content}");
    if code.starts_with('2') {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs `program` with `args`, copying its stdout to ours, and times (from just before the
/// spawn) the first line holding `text` and the program's exit; kills it after `seconds`.
/// For boot-time measurements inside the emulated host, where busybox has no finer clock
/// than the shell's.
fn time_to_line(text: &str, seconds: f64, program: &str, args: &[&str]) -> ExitCode {
    let start = Instant::now();
    let spawned = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(err) => {
            eprintln!("hosted-tool: cannot run {program}: {err}");
            return ExitCode::FAILURE;
        }
    };
    let output = child.stdout.take().expect("the child's stdout is piped");
    let text = text.as_bytes().to_vec();
    // The reader owns the pipe; it tells the main thread when the pipe has ended, so that the
    // main thread can wait for that with a time-out and kill the child.
    let (ended, end) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut output = BufReader::new(output);
        let mut stdout = std::io::stdout().lock();
        let (mut line, mut seen, mut at_line_start) = (Vec::new(), None, true);
        loop {
            line.clear();
            match output.read_until(b'\n', &mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if seen.is_none()
                && (text.is_empty() || line.windows(text.len()).any(|w| w == text.as_slice()))
            {
                seen = Some(start.elapsed());
            }
            let _ = stdout.write_all(&line);
            at_line_start = line.ends_with(b"\n");
        }
        if !at_line_start {
            let _ = stdout.write_all(b"\n");
        }
        let _ = stdout.flush();
        let _ = ended.send(());
        seen
    });
    let deadline = start + Duration::from_secs_f64(seconds);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut in_time = end.recv_timeout(left()).is_ok();
    // The pipe has ended: the child is exiting (or has closed its stdout and hangs).
    while in_time && matches!(child.try_wait(), Ok(None)) {
        in_time = !left().is_zero();
        std::thread::sleep(Duration::from_millis(1));
    }
    if !in_time {
        let _ = child.kill();
    }
    let status = child.wait();
    let exited = start.elapsed();
    let seen = reader.join().expect("the reading thread panicked");
    let ms = |d: Duration| format!("{:.3}", d.as_secs_f64() * 1000.0);
    let status = match status {
        _ if !in_time => "timeout".to_string(),
        Ok(status) => match status.code() {
            Some(code) => code.to_string(),
            None => format!("{status}").replace(' ', "-"),
        },
        Err(err) => format!("wait-failed:{}", err.kind()),
    };
    println!(
        "time-to-line: line-ms={} exit-ms={} status={status}",
        seen.map_or("none".to_string(), ms),
        ms(exited),
    );
    if seen.is_some() && status == "0" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
