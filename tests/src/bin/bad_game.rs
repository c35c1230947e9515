//! `berth-bad-game`: a game server that breaks Arcus (ARCUS.md) on purpose, so the end-to-end
//! tests can show that the agent closes only that game's link, keeps reconnecting, and never
//! lets such a game be allocated.
//!
//! Flags: `--management-port P --port G --mode MODE [--count-file FILE] [--frames-file FILE]
//! [--log-lines N] [--instance-id ID]`
//! (`--flag value` or `--flag=value`). With `--log-lines N`, whatever the mode, the game writes
//! N numbered lines of 100 bytes to stdout (its log), one a millisecond:
//! `line 000000 ...`, so a test can check that log rotation keeps them in order without gaps. Every accepted management connection appends one line
//! to the count file, so a test can see the agent reconnect; each new connection plays the mode
//! again. The game port accepts connections and ignores them.
//!
//! Modes:
//! * `bad-hello`: sends a 6-byte hello with the wrong version.
//! * `bad-frame`: correct handshake, status 4, then a frame with non-zero flags.
//! * `huge-frame`: correct handshake, then a header announcing a 0x00020000-byte payload.
//! * `array-root`: correct handshake, then a status frame whose payload is `[4]`.
//! * `never-confirm`: correct handshake, status 4, then health every 2 s and nothing else;
//!   it never reports status 5, so a `confirmAllocation` allocation can only time out.
//! * `log-frames`: correct handshake, status 4, then it never sends another frame; every frame
//!   the agent sends is appended to `--frames-file` as
//!   `<microseconds since the connection> <opcode in hex>`, so a test can see how the agent
//!   paces frames to a game that does not answer.
//!
//! Plain std and threads: nothing here may share code with the SDK whose rules it breaks.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;
use std::time::{Duration, Instant};

const HELLO: [u8; 6] = [0x61, 0x72, 0x63, 0x00, 0x01, 0x00];
const HELLO_REPLY: [u8; 12] = [0, 0x04, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
const OP_HEALTH: u8 = 0x02;
const OP_STATUS: u8 = 0x71;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    BadHello,
    BadFrame,
    HugeFrame,
    ArrayRoot,
    NeverConfirm,
    LogFrames,
}

impl Mode {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "bad-hello" => Self::BadHello,
            "bad-frame" => Self::BadFrame,
            "huge-frame" => Self::HugeFrame,
            "array-root" => Self::ArrayRoot,
            "never-confirm" => Self::NeverConfirm,
            "log-frames" => Self::LogFrames,
            _ => return None,
        })
    }
}

#[derive(Debug)]
struct Args {
    port: u16,
    management_port: u16,
    mode: Mode,
    count_file: Option<String>,
    frames_file: Option<String>,
    log_lines: u32,
}

fn parse_args() -> Result<Args, String> {
    let mut port = None;
    let mut management_port = None;
    let mut mode = None;
    let mut count_file = None;
    let mut frames_file = None;
    let mut log_lines = 0;
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let (name, inline) = match arg.split_once('=') {
            Some((n, v)) => (n.to_owned(), Some(v.to_owned())),
            None => (arg.clone(), None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        match name.as_str() {
            "--port" => port = Some(value()?.parse().map_err(|e| format!("--port: {e}"))?),
            "--management-port" => {
                management_port = Some(
                    value()?
                        .parse()
                        .map_err(|e| format!("--management-port: {e}"))?,
                );
            }
            "--mode" => {
                let v = value()?;
                mode = Some(Mode::parse(&v).ok_or_else(|| format!("unknown --mode {v}"))?);
            }
            "--count-file" => count_file = Some(value()?),
            "--frames-file" => frames_file = Some(value()?),
            "--log-lines" => {
                log_lines = value()?.parse().map_err(|e| format!("--log-lines: {e}"))?;
            }
            // Only there so tests can find the process by instance id.
            "--instance-id" => {
                value()?;
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(Args {
        port: port.ok_or("--port is required")?,
        management_port: management_port.ok_or("--management-port is required")?,
        mode: mode.ok_or("--mode is required")?,
        count_file,
        frames_file,
        log_lines,
    })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("berth-bad-game: {e}");
            return ExitCode::from(2);
        }
    };
    let game = match TcpListener::bind((Ipv4Addr::UNSPECIFIED, args.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "berth-bad-game: cannot listen on game port {}: {e}",
                args.port
            );
            return ExitCode::FAILURE;
        }
    };
    let management = match TcpListener::bind((Ipv4Addr::LOCALHOST, args.management_port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "berth-bad-game: cannot listen on management port {}: {e}",
                args.management_port
            );
            return ExitCode::FAILURE;
        }
    };
    eprintln!(
        "berth-bad-game listening game={} management={} mode={:?}",
        args.port, args.management_port, args.mode
    );
    let lines = args.log_lines;
    thread::spawn(move || write_log_lines(lines));
    thread::spawn(move || {
        for conn in game.incoming() {
            drop(conn);
        }
    });
    let connections = AtomicU32::new(0);
    for conn in management.incoming() {
        let Ok(stream) = conn else { continue };
        let n = connections.fetch_add(1, Ordering::Relaxed) + 1;
        eprintln!("management connection {n}");
        if let Some(path) = &args.count_file {
            let appended = OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| writeln!(f, "connection {n}"));
            if let Err(e) = appended {
                eprintln!("berth-bad-game: cannot append to {path}: {e}");
            }
        }
        let mode = args.mode;
        let frames_file = args.frames_file.clone();
        thread::spawn(move || {
            if let Err(e) = play(mode, stream, frames_file.as_deref()) {
                eprintln!("connection {n}: {e}");
            }
        });
    }
    ExitCode::SUCCESS
}

fn frame(opcode: u8, packet_id: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![0, opcode, 0, 0];
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn handshake(stream: &mut TcpStream) -> std::io::Result<()> {
    stream.write_all(&HELLO)?;
    let mut reply = [0u8; 12];
    stream.read_exact(&mut reply)?;
    if reply != HELLO_REPLY {
        return Err(std::io::Error::other(format!(
            "the agent answered the hello with {reply:02x?}"
        )));
    }
    Ok(())
}

/// Writes `n` numbered lines of 100 bytes (newline included) to stdout, one a millisecond.
fn write_log_lines(n: u32) {
    let mut out = std::io::stdout();
    for i in 0..n {
        // Stdout is line-buffered: one write per line, as a game's logger does.
        if writeln!(out, "line {i:06} {:.<87}", "").is_err() {
            return;
        }
        thread::sleep(Duration::from_millis(1));
    }
}

/// Reads and ignores whatever the agent sends until it closes the connection.
fn drain(mut stream: TcpStream) {
    let mut buf = [0u8; 4096];
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
}

/// Appends a line per frame the agent sends (after the handshake) until it closes the
/// connection. Frames are split from the byte stream by their 12-byte headers.
fn log_frames(mut stream: TcpStream, path: &str) -> std::io::Result<()> {
    let started = Instant::now();
    let mut log = OpenOptions::new().create(true).append(true).open(path)?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        let at = started.elapsed().as_micros();
        buf.extend_from_slice(&chunk[..n]);
        let mut lines = String::new();
        while buf.len() >= 12 {
            let len = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]) as usize;
            if buf.len() < 12 + len {
                break;
            }
            lines.push_str(&format!("{at} {:02x}\n", buf[1]));
            buf.drain(..12 + len);
        }
        log.write_all(lines.as_bytes())?;
    }
}

fn play(mode: Mode, mut stream: TcpStream, frames_file: Option<&str>) -> std::io::Result<()> {
    let status4 = frame(OP_STATUS, 1, br#"{"status":4}"#);
    match mode {
        Mode::BadHello => {
            let mut hello = HELLO;
            hello[4] = 2;
            stream.write_all(&hello)?;
        }
        Mode::BadFrame => {
            handshake(&mut stream)?;
            let mut bad = frame(OP_HEALTH, 2, b"");
            bad[0] = 0x01;
            let mut out = status4;
            out.extend_from_slice(&bad);
            stream.write_all(&out)?;
        }
        Mode::HugeFrame => {
            handshake(&mut stream)?;
            let mut header = frame(OP_STATUS, 1, b"");
            header[8..12].copy_from_slice(&0x0002_0000u32.to_be_bytes());
            stream.write_all(&header)?;
        }
        Mode::ArrayRoot => {
            handshake(&mut stream)?;
            stream.write_all(&frame(OP_STATUS, 1, b"[4]"))?;
        }
        Mode::LogFrames => {
            handshake(&mut stream)?;
            stream.write_all(&status4)?;
            let path = frames_file
                .ok_or_else(|| std::io::Error::other("--mode log-frames needs --frames-file"))?;
            return log_frames(stream, path);
        }
        Mode::NeverConfirm => {
            handshake(&mut stream)?;
            stream.write_all(&status4)?;
            let mut writer = stream.try_clone()?;
            // Health keeps the link alive (the agent drops it after 20 s of silence); what
            // the agent sends, allocations included, is read and never answered.
            thread::spawn(move || {
                let mut id = 2u32;
                loop {
                    thread::sleep(Duration::from_secs(2));
                    if writer.write_all(&frame(OP_HEALTH, id, b"")).is_err() {
                        return;
                    }
                    id = id.wrapping_add(1);
                }
            });
        }
    }
    drain(stream);
    Ok(())
}
