//! One static program for both sides of the emulated-host tests (tests/hosted.rs): inside a
//! guest it is the guest program that talks vsock, inside the emulated host it is the host
//! side (Unix sockets: mote's vsock socket and API). It has no dependencies, so the tests
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
//! ```
//! Listeners print `ready` on stderr once they accept connections. A stream copies stdin to
//! the socket (then half-closes it) and the socket to stdout, until both have ended.

mod sock;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::process::ExitCode;

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
