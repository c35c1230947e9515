//! The agent's Arcus client: one task per running game process (ARCUS.md §6).
//!
//! The task connects to the game's management port on loopback, checks the hello, answers it,
//! sends host and instance information, and then relays: frames from the game become
//! [`LinkEvent`]s for the supervisor, and messages from the supervisor become frames. It
//! reconnects on its own (every 200 ms while the game starts, with backoff capped at 5 s after
//! a drop) and ends when the supervisor drops its sender.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use berth_protocol::arcus::{
    self, ArcusError, Decoder, Encoder, Frame, HEALTH_INTERVAL, LINK_TIMEOUT, MAX_BURST, Message,
    Role,
};
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep_until, timeout};

use crate::supervisor::{Command, LinkEvent};

/// Time the game has to send its hello once we are connected.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
const RETRY_STARTING: Duration = Duration::from_millis(200);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// A game refusing connections longer than this is reported (its instance view says why the
/// link is down); a refusal while a game starts is normal, and not worth a report.
const NOT_LISTENING_AFTER: Duration = Duration::from_secs(2);
/// After `MAX_BURST` frames without hearing from the game, wait this long before writing more:
/// the SDK drops links that queue more than 48 messages between two of its ticks.
const BURST_PAUSE: Duration = Duration::from_millis(50);
/// A game sends a frame at least every health interval (5 s). One that has sent nothing for
/// half as long again is frozen, stopped or deadlocked: it is not offered for allocation (a
/// match sent there would wait for a server that does not run) until it sends again. The link
/// itself stays open until [`LINK_TIMEOUT`], as the protocol says.
const SILENT_AFTER: Duration = Duration::from_millis(HEALTH_INTERVAL.as_millis() as u64 * 3 / 2);
const OVERDUE_RECHECK: Duration = Duration::from_millis(100);

/// What the link needs to know about its instance.
#[derive(Debug)]
pub struct LinkParams {
    pub instance_id: String,
    /// The process run this link belongs to; events from older runs are ignored.
    pub run: u64,
    pub management_port: u16,
    pub host_information: Map<String, Value>,
    pub instance_information: Map<String, Value>,
}

/// Starts the link task. Messages sent on the returned sender reach the game while the link
/// is up; dropping the sender ends the task.
pub fn start(params: LinkParams, events: mpsc::Sender<Command>) -> mpsc::Sender<Message> {
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(run(params, events, rx));
    tx
}

async fn run(
    params: LinkParams,
    events: mpsc::Sender<Command>,
    mut outgoing: mpsc::Receiver<Message>,
) {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, params.management_port));
    let mut backoff = RETRY_STARTING;
    let mut ever_connected = false;
    // Since when connections are refused, and what was last reported about it.
    let mut refused_since: Option<Instant> = None;
    let mut reported: Option<String> = None;
    loop {
        let wait = match TcpStream::connect(addr).await {
            Ok(stream) => {
                refused_since = None;
                reported = None;
                let _ = stream.set_nodelay(true);
                let outcome = session(stream, &params, &events, &mut outgoing).await;
                match outcome {
                    Outcome::Finished => return,
                    Outcome::Closed {
                        handshake_done,
                        reason,
                    } => {
                        if handshake_done {
                            ever_connected = true;
                            backoff = RETRY_STARTING;
                            send(&events, &params, LinkEvent::Disconnected { reason }).await;
                        } else {
                            send(&events, &params, LinkEvent::ProtocolError { reason }).await;
                        }
                    }
                    Outcome::Failed(e) => {
                        send(
                            &events,
                            &params,
                            LinkEvent::ProtocolError {
                                reason: e.to_string(),
                            },
                        )
                        .await;
                    }
                }
                backoff = (backoff * 2).min(BACKOFF_CAP);
                backoff
            }
            Err(e) => {
                let since = *refused_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= NOT_LISTENING_AFTER {
                    let reason = format!(
                        "the game does not accept connections on its management port {addr} ({e}); it must listen there for the agent's Arcus link (the profile passes the port as {{managementPort}})"
                    );
                    if reported.as_ref() != Some(&reason) {
                        send(
                            &events,
                            &params,
                            LinkEvent::NotListening {
                                reason: reason.clone(),
                            },
                        )
                        .await;
                        reported = Some(reason);
                    }
                }
                if ever_connected {
                    backoff = (backoff * 2).min(BACKOFF_CAP);
                    backoff
                } else {
                    // Not listening yet: the game is still starting.
                    RETRY_STARTING
                }
            }
        };
        // Wait before reconnecting, but end at once when the supervisor lets go; messages
        // that arrive while there is no link cannot be delivered and are dropped.
        let deadline = Instant::now() + wait;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => break,
                msg = outgoing.recv() => match msg {
                    None => return,
                    Some(m) => tracing::debug!(instance_id = %params.instance_id, opcode = ?m.opcode(), "Arcus link down; message dropped"),
                },
            }
        }
    }
}

enum Outcome {
    /// The supervisor dropped its sender: the process is gone or being replaced.
    Finished,
    Closed {
        handshake_done: bool,
        reason: String,
    },
    Failed(ArcusError),
}

async fn send(events: &mpsc::Sender<Command>, params: &LinkParams, event: LinkEvent) {
    let _ = events
        .send(Command::Link {
            id: params.instance_id.clone(),
            run: params.run,
            event,
        })
        .await;
}

async fn session(
    mut stream: TcpStream,
    params: &LinkParams,
    events: &mpsc::Sender<Command>,
    outgoing: &mut mpsc::Receiver<Message>,
) -> Outcome {
    // The agent speaks only after the game's hello (ARCUS.md §2).
    let mut hello = [0u8; arcus::HELLO.len()];
    match timeout(HELLO_TIMEOUT, stream.read_exact(&mut hello)).await {
        Err(_) => {
            return Outcome::Closed {
                handshake_done: false,
                reason: format!(
                    "the game sent no hello within {} s",
                    HELLO_TIMEOUT.as_secs()
                ),
            };
        }
        Ok(Err(e)) => {
            return Outcome::Closed {
                handshake_done: false,
                reason: format!("connection closed before the hello: {e}"),
            };
        }
        Ok(Ok(_)) => {}
    }
    if let Err(e) = arcus::check_hello(&hello) {
        return Outcome::Failed(e);
    }
    let mut encoder = Encoder::new();
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(&arcus::HELLO_REPLY);
    for m in [
        Message::HostInformation(params.host_information.clone()),
        Message::InstanceInformation(params.instance_information.clone()),
    ] {
        if let Err(e) = encoder.encode(&m, &mut out) {
            return Outcome::Failed(e);
        }
    }
    if let Err(e) = stream.write_all(&out).await {
        return Outcome::Closed {
            handshake_done: false,
            reason: format!("cannot answer the hello: {e}"),
        };
    }
    send(events, params, LinkEvent::Connected).await;

    let (mut reader, mut writer) = stream.into_split();
    let mut decoder = Decoder::new(Role::Agent);
    // Game frames are a few hundred bytes, and the decoder reassembles partial ones: a small
    // buffer keeps a thousand links cheap.
    let mut buf = vec![0u8; 2048];
    let mut health = tokio::time::interval_at(Instant::now() + HEALTH_INTERVAL, HEALTH_INTERVAL);
    let mut last_frame = Instant::now();
    let mut unanswered = 0usize;
    let mut paused = false;
    // One timer, set when a burst pauses the link: a select branch's future is built on every
    // turn even while the branch is disabled, and a new `sleep` (with a clock read for its
    // deadline) for every frame is work a thousand links do for nothing.
    let pause = sleep_until(Instant::now());
    tokio::pin!(pause);
    // Fires at most once per frame gap: when it finds a frame read since it was set, it is set
    // again from that frame, instead of being reset for every frame read.
    let quiet = sleep_until(last_frame + SILENT_AFTER);
    tokio::pin!(quiet);
    let mut silent = false;
    // Found overdue once: looked at again a moment later, so that frames already waiting in the
    // socket (this task did not run: the agent was stopped or starved) are read first.
    let mut overdue = false;
    let closed = |reason: String| Outcome::Closed {
        handshake_done: true,
        reason,
    };
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => {
                let n = match read {
                    Ok(0) => return closed("the game closed the connection".to_owned()),
                    Ok(n) => n,
                    Err(e) => return closed(format!("read failed: {e}")),
                };
                decoder.extend(&buf[..n]);
                loop {
                    match decoder.next_frame() {
                        Ok(None) => break,
                        Ok(Some(frame)) => {
                            last_frame = Instant::now();
                            unanswered = 0;
                            paused = false;
                            if silent {
                                silent = false;
                                quiet.as_mut().reset(last_frame + SILENT_AFTER);
                                send(events, params, LinkEvent::Heard).await;
                            }
                            if let Frame::Message { message, .. } = frame
                                && let Some(event) = event_for(message)
                            {
                                send(events, params, event).await;
                            }
                        }
                        Err(e) => return Outcome::Failed(e),
                    }
                }
            }
            msg = outgoing.recv(), if !paused => {
                let Some(msg) = msg else { return Outcome::Finished };
                out.clear();
                if let Err(e) = encoder.encode(&msg, &mut out) {
                    tracing::warn!(instance_id = %params.instance_id, error = %e, "message not sent to the game");
                    continue;
                }
                // Drain what is already queued into the same write, within the burst limit.
                unanswered += 1;
                while unanswered < MAX_BURST {
                    let Ok(next) = outgoing.try_recv() else { break };
                    if encoder.encode(&next, &mut out).is_ok() {
                        unanswered += 1;
                    }
                }
                if let Err(e) = writer.write_all(&out).await {
                    return closed(format!("write failed: {e}"));
                }
                if unanswered >= MAX_BURST {
                    pause.as_mut().reset(Instant::now() + BURST_PAUSE);
                    paused = true;
                }
            }
            () = &mut quiet, if !silent => {
                let due = last_frame + SILENT_AFTER;
                if due > Instant::now() {
                    overdue = false;
                    quiet.as_mut().reset(due);
                } else if !overdue {
                    overdue = true;
                    quiet.as_mut().reset(Instant::now() + OVERDUE_RECHECK);
                } else {
                    overdue = false;
                    silent = true;
                    let reason = format!(
                        "the game has sent nothing on its Arcus link for {:.1} s (it must send a health frame every {} s): it is not offered for allocation until it sends again",
                        last_frame.elapsed().as_secs_f64(),
                        HEALTH_INTERVAL.as_secs()
                    );
                    send(events, params, LinkEvent::Silent { reason }).await;
                }
            }
            // A fixed deadline, so frames read or health sent meanwhile do not push it back.
            () = &mut pause, if paused => {
                paused = false;
                unanswered = 0;
            }
            _ = health.tick() => {
                out.clear();
                if encoder.encode(&Message::Health, &mut out).is_ok()
                    && let Err(e) = writer.write_all(&out).await
                {
                    return closed(format!("write failed: {e}"));
                }
                if last_frame.elapsed() >= LINK_TIMEOUT {
                    return closed(format!(
                        "no frame from the game for {} s",
                        LINK_TIMEOUT.as_secs()
                    ));
                }
            }
        }
    }
}

fn event_for(message: Message) -> Option<LinkEvent> {
    match message {
        Message::InstanceStatus { status } => Some(LinkEvent::Status(status)),
        Message::LiveState(state) => Some(LinkEvent::LiveState(state)),
        Message::ReverseMetadata(data) => Some(LinkEvent::ReverseMetadata(data)),
        // Health only proves the link is alive, which reading it already did.
        _ => None,
    }
}
