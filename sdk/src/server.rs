//! The listener task: handshakes, the current agent link, and the game's state.
//!
//! Everything mutable lives in one task ([`Task`]); the game reaches it only through a command
//! channel and hears from it only through an event channel, so there is no lock and no state to
//! keep consistent across tasks. Handshakes run in short-lived child tasks because a peer that
//! never answers the hello must not stall the link that is already up.

use std::collections::VecDeque;
use std::future;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use berth_protocol::KeyValue;
use berth_protocol::arcus::{
    self, ArcusError, Decoder, Encoder, Frame, HEADER_LEN, HEALTH_INTERVAL, HELLO, HELLO_REPLY,
    LINK_TIMEOUT, LiveState, MAX_PAYLOAD_LEN, Message, Opcode, Role,
};
use berth_protocol::metadata;
use serde_json::{Map, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, sleep, timeout};

use crate::{GameStatus, SdkError};

/// How long the agent has to answer the hello. ARCUS.md asks the agent for 1 s; the game is
/// more lenient so a loaded host does not lose its link to scheduling jitter.
pub const HELLO_REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// Connections still in their handshake. More are refused at once, so a flood of idle
/// connections cannot pin unbounded memory.
const MAX_HANDSHAKES: usize = 8;
/// Events the game may fall behind by before the task stops reading from the agent. Frames are
/// only decoded while the game keeps up, so this is the whole event backlog.
const EVENT_CAPACITY: usize = 32;
/// An agent that leaves this much of our output unread is not reading at all.
const MAX_OUTBOUND: usize = 1 << 20;
/// Reverse metadata sent while no agent is connected is delivered on the next link, up to this
/// many messages (the oldest are dropped first).
const MAX_UNSENT_REVERSE: usize = 16;
const READ_CHUNK: usize = 4096;
/// Pause after a failed accept (for example out of file descriptors) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Something the agent did, delivered to the game in order.
#[derive(Debug)]
pub enum Event {
    /// An agent completed the handshake; it already has the current status.
    Connected {
        peer: SocketAddr,
    },
    /// The agent link is gone. The server keeps listening for the next agent.
    Disconnected {
        reason: LinkClosed,
    },
    /// A connection was closed during the handshake and never became the link.
    Rejected {
        peer: SocketAddr,
        reason: HandshakeError,
    },
    /// Finish and exit; the agent terminates the process after `timeout` seconds.
    SoftStop {
        timeout: i32,
    },
    Metadata(Vec<KeyValue>),
    CustomCommand(Vec<KeyValue>),
    HostInformation(Map<String, Value>),
    /// A matchmaker allocated this instance; the data is the allocation's metadata.
    Allocated(Vec<KeyValue>),
    InstanceInformation(Map<String, Value>),
}

/// Why an established link was closed.
#[derive(Debug, thiserror::Error)]
pub enum LinkClosed {
    #[error("the agent closed the connection")]
    Eof,
    #[error("a new agent connection replaced this one")]
    Replaced,
    #[error("no frame from the agent for {}s", LINK_TIMEOUT.as_secs())]
    Timeout,
    #[error("the agent sent invalid Arcus: {0}")]
    Protocol(#[from] ArcusError),
    #[error("the agent left {0} bytes unread")]
    Backlog(usize),
    #[error("I/O error on the agent link: {0}")]
    Io(#[from] io::Error),
}

/// Why a connection did not become the agent link.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("bad handshake: {0}")]
    Protocol(#[from] ArcusError),
    #[error("no hello reply within {}s", HELLO_REPLY_TIMEOUT.as_secs())]
    Timeout,
    #[error("too many connections in their handshake; refused")]
    Busy,
    #[error("I/O error during the handshake: {0}")]
    Io(#[from] io::Error),
}

#[derive(Debug)]
enum Command {
    Status(GameStatus),
    LiveState(LiveState),
    ReverseMetadata(Vec<KeyValue>),
}

/// The game's side of the channel to the server task. Cheap to clone; the task runs until the
/// last handle (including the one inside [`ArcusServer`]) is dropped.
#[derive(Debug, Clone)]
pub struct ArcusHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl ArcusHandle {
    /// Records the game's status and sends it to the agent if it changed. It is re-sent on
    /// every new link.
    pub fn set_status(&self, status: GameStatus) -> Result<(), SdkError> {
        self.send(Command::Status(status))
    }

    /// Records the live state and sends it to the agent if it changed. A link that comes up
    /// later gets it only if it changed since it was last sent (ARCUS.md §2).
    pub fn set_live_state(&self, state: LiveState) -> Result<(), SdkError> {
        // Checked here, where the game can still act on the error; the task would only be
        // able to drop the message.
        const NAMED: [&str; 6] = ["players", "maxPlayers", "name", "map", "mode", "version"];
        if let Some(key) = NAMED.iter().find(|k| state.extra.contains_key(**k)) {
            // `extra` is flattened beside the named fields, so this would put the key in the
            // JSON twice, which the agent rejects as a duplicate field and drops the link.
            return Err(ArcusError::InvalidPayload {
                opcode: Opcode::LiveState,
                reason: format!("extra field {key:?} repeats a named live state field"),
            }
            .into());
        }
        let len = arcus::json_len(&state).map_err(|e| ArcusError::InvalidPayload {
            opcode: Opcode::LiveState,
            reason: e.to_string(),
        })?;
        if len > MAX_PAYLOAD_LEN as usize {
            return Err(ArcusError::PayloadTooLarge {
                opcode: Opcode::LiveState,
                len,
            }
            .into());
        }
        self.send(Command::LiveState(state))
    }

    /// Sends metadata from the game to the platform (0x41). Without an agent it is kept for the
    /// next link (the last 16 messages).
    pub fn send_reverse_metadata(&self, data: Vec<KeyValue>) -> Result<(), SdkError> {
        metadata::validate(&data)?;
        self.send(Command::ReverseMetadata(data))
    }

    fn send(&self, command: Command) -> Result<(), SdkError> {
        self.commands.send(command).map_err(|_| SdkError::Stopped)
    }
}

/// The stream of [`Event`]s.
///
/// Keep reading it: while the game is behind by more than a few events the server stops
/// reading from the agent (the link then times out after 20 s). Dropping it is fine — events
/// are then discarded.
#[derive(Debug)]
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the server task has stopped.
    pub async fn recv(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

/// A running Arcus server: the listener task plus the game's handle and event stream.
#[derive(Debug)]
pub struct ArcusServer {
    handle: ArcusHandle,
    events: Events,
    local_addr: SocketAddr,
}

impl ArcusServer {
    /// Listens on `127.0.0.1:port` (the agent always connects over loopback) and starts the
    /// server task on the current tokio runtime. The status starts as
    /// [`GameStatus::Starting`]. Port 0 picks a free port; see [`ArcusServer::local_addr`].
    pub async fn bind(port: u16) -> Result<Self, SdkError> {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| SdkError::Bind { addr, source })?;
        let local_addr = listener
            .local_addr()
            .map_err(|source| SdkError::Bind { addr, source })?;
        let (commands_tx, commands) = mpsc::unbounded_channel();
        let (events_tx, events_rx) = mpsc::channel(EVENT_CAPACITY);
        let task = Task {
            listener,
            commands,
            events_closed: false,
            pending: VecDeque::new(),
            handshakes: JoinSet::new(),
            link: None,
            status: GameStatus::Starting,
            live_state: None,
            live_state_unsent: false,
            unsent_reverse: VecDeque::new(),
        };
        tokio::spawn(task.run(events_tx));
        Ok(Self {
            handle: ArcusHandle {
                commands: commands_tx,
            },
            events: Events { rx: events_rx },
            local_addr,
        })
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    pub fn handle(&self) -> &ArcusHandle {
        &self.handle
    }

    /// The next event; `None` once the server task has stopped.
    pub async fn next_event(&mut self) -> Option<Event> {
        self.events.recv().await
    }

    /// Splits the server so the handle and the event stream can live in different places.
    pub fn into_parts(self) -> (ArcusHandle, Events) {
        (self.handle, self.events)
    }
}

/// The established agent link.
struct Link {
    stream: TcpStream,
    decoder: Decoder,
    encoder: Encoder,
    /// Encoded frames the socket has not taken yet.
    out: Vec<u8>,
    last_frame: Instant,
    next_health: Instant,
}

impl Link {
    fn new(stream: TcpStream) -> Self {
        let now = Instant::now();
        Self {
            stream,
            decoder: Decoder::new(Role::Game),
            encoder: Encoder::new(),
            out: Vec::new(),
            last_frame: now,
            next_health: now + HEALTH_INTERVAL,
        }
    }

    fn queue(&mut self, message: &Message) {
        // Encoding fails only for payloads over the frame limit, which the handle refuses
        // before they reach the task; nothing is written in that case.
        let _ = self.encoder.encode(message, &mut self.out);
    }

    /// Writes what the socket takes without waiting; the rest goes when it is writable.
    fn flush(&mut self) -> Result<(), LinkClosed> {
        let mut written = 0;
        while written < self.out.len() {
            match self.stream.try_write(&self.out[written..]) {
                Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
                Ok(n) => written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        self.out.drain(..written);
        if self.out.len() > MAX_OUTBOUND {
            return Err(LinkClosed::Backlog(self.out.len()));
        }
        Ok(())
    }

    fn send(&mut self, message: &Message) -> Result<(), LinkClosed> {
        self.queue(message);
        self.flush()
    }

    fn deadline(&self) -> Instant {
        (self.last_frame + LINK_TIMEOUT).min(self.next_health)
    }
}

struct Task {
    listener: TcpListener,
    commands: mpsc::UnboundedReceiver<Command>,
    /// The game dropped its [`Events`]; events are discarded from then on.
    events_closed: bool,
    /// Events not yet taken by the game; see [`EVENT_CAPACITY`].
    pending: VecDeque<Event>,
    handshakes: JoinSet<(SocketAddr, Result<TcpStream, HandshakeError>)>,
    link: Option<Link>,
    status: GameStatus,
    live_state: Option<LiveState>,
    /// The live state changed since it was last sent on any link.
    live_state_unsent: bool,
    unsent_reverse: VecDeque<Vec<KeyValue>>,
}

impl Task {
    /// `events` stays outside `self`: a pending send permit borrows it while the handlers
    /// need `self` mutably.
    async fn run(mut self, events: mpsc::Sender<Event>) {
        // One timer for the whole loop, moved only when the link's deadline moves (every
        // health interval): a new `sleep` per turn would enter the runtime's timer wheel and
        // leave it again for every frame.
        let timer = sleep(Duration::ZERO);
        tokio::pin!(timer);
        let mut armed: Option<Instant> = None;
        loop {
            // Agent frames are decoded only while the game keeps up with events, which keeps
            // memory bounded without ever blocking the loop on the game.
            let read = self.link.is_some() && self.pending.is_empty();
            let write = self.link.as_ref().is_some_and(|l| !l.out.is_empty());
            let deadline = self.link.as_ref().map(Link::deadline);
            if deadline != armed {
                if let Some(at) = deadline {
                    timer.as_mut().reset(at);
                }
                armed = deadline;
            }
            tokio::select! {
                // Rare branches first, so an agent that floods the link cannot starve the
                // timers or a replacement connection. Commands lead so that a link coming up in
                // the same turn starts with the newest status, not a stale one and an update.
                biased;
                command = self.commands.recv() => match command {
                    Some(command) => self.apply(command),
                    None => return,
                },
                () = &mut timer, if armed.is_some() => {
                    // Fired: the next turn sets it from the link's new deadline (`on_timer`
                    // moves the health deadline or closes the link).
                    armed = None;
                    self.on_timer();
                }
                Some(joined) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    // A handshake task only fails to join if it panicked or the set is being
                    // dropped; either way there is no connection left to use.
                    if let Ok((peer, result)) = joined {
                        self.on_handshake(peer, result);
                    }
                }
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, peer)) => self.on_accept(stream, peer),
                    Err(_) => sleep(ACCEPT_BACKOFF).await,
                },
                permit = events.reserve(), if !self.pending.is_empty() => {
                    match permit {
                        Ok(permit) => {
                            if let Some(event) = self.pending.pop_front() {
                                permit.send(event);
                            }
                        }
                        Err(_) => {
                            self.events_closed = true;
                            self.pending.clear();
                        }
                    }
                    self.decode_frames(&events);
                }
                ready = writable(self.link.as_ref()), if write => {
                    let flushed = match (ready, self.link.as_mut()) {
                        (Err(e), _) => Err(e.into()),
                        (Ok(()), Some(link)) => link.flush(),
                        (Ok(()), None) => Ok(()),
                    };
                    if let Err(reason) = flushed {
                        self.close_link(reason);
                    }
                }
                ready = readable(self.link.as_ref()), if read => self.on_readable(ready, &events),
            }
        }
    }

    fn apply(&mut self, command: Command) {
        match command {
            Command::Status(status) => {
                if status != self.status {
                    self.status = status;
                    self.send_now(&Message::InstanceStatus {
                        status: status.number(),
                    });
                }
            }
            Command::LiveState(state) => {
                if self.live_state.as_ref() != Some(&state) {
                    let message = Message::LiveState(state.clone());
                    self.live_state = Some(state);
                    self.live_state_unsent = !self.send_now(&message);
                }
            }
            Command::ReverseMetadata(data) => {
                if self.link.is_some() {
                    self.send_now(&Message::ReverseMetadata(data));
                } else {
                    if self.unsent_reverse.len() == MAX_UNSENT_REVERSE {
                        self.unsent_reverse.pop_front();
                    }
                    self.unsent_reverse.push_back(data);
                }
            }
        }
    }

    /// Sends on the current link, if any; true if the link took the frame.
    fn send_now(&mut self, message: &Message) -> bool {
        let Some(link) = self.link.as_mut() else {
            return false;
        };
        match link.send(message) {
            Ok(()) => true,
            Err(reason) => {
                self.close_link(reason);
                false
            }
        }
    }

    fn on_accept(&mut self, stream: TcpStream, peer: SocketAddr) {
        if self.handshakes.len() >= MAX_HANDSHAKES {
            drop(stream);
            self.push_event(Event::Rejected {
                peer,
                reason: HandshakeError::Busy,
            });
            return;
        }
        self.handshakes
            .spawn(async move { (peer, handshake(stream).await) });
    }

    fn on_handshake(&mut self, peer: SocketAddr, result: Result<TcpStream, HandshakeError>) {
        let stream = match result {
            Ok(stream) => stream,
            Err(reason) => {
                self.push_event(Event::Rejected { peer, reason });
                return;
            }
        };
        // Replace only once the newcomer proved it speaks Arcus: a stray connection to the
        // management port must not cost the game its agent.
        if self.link.is_some() {
            self.close_link(LinkClosed::Replaced);
        }
        let mut link = Link::new(stream);
        link.queue(&Message::InstanceStatus {
            status: self.status.number(),
        });
        let live_state = match &self.live_state {
            Some(state) if self.live_state_unsent => {
                link.queue(&Message::LiveState(state.clone()));
                true
            }
            _ => false,
        };
        for data in &self.unsent_reverse {
            link.queue(&Message::ReverseMetadata(data.clone()));
        }
        self.push_event(Event::Connected { peer });
        match link.flush() {
            Ok(()) => {
                if live_state {
                    self.live_state_unsent = false;
                }
                self.unsent_reverse.clear();
                self.link = Some(link);
            }
            Err(reason) => self.push_event(Event::Disconnected { reason }),
        }
    }

    fn on_readable(&mut self, ready: io::Result<()>, events: &mpsc::Sender<Event>) {
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if let Err(e) = ready {
            self.close_link(e.into());
            return;
        }
        let mut buf = [0u8; READ_CHUNK];
        match read_available(&link.stream, &mut buf) {
            Ok(0) => self.close_link(LinkClosed::Eof),
            Ok(n) => {
                link.decoder.extend(&buf[..n]);
                self.decode_frames(events);
            }
            // Readiness can be spurious; the next turn waits again.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => self.close_link(e.into()),
        }
    }

    /// Decodes buffered frames until an event has to wait for the game (or the buffer is
    /// empty).
    fn decode_frames(&mut self, events: &mpsc::Sender<Event>) {
        while self.pending.is_empty() {
            let Some(link) = self.link.as_mut() else {
                return;
            };
            match link.decoder.next_frame() {
                Ok(None) => return,
                Ok(Some(frame)) => {
                    link.last_frame = Instant::now();
                    if let Some(event) = event_for(frame) {
                        self.deliver(event, events);
                    }
                }
                Err(e) => {
                    self.close_link(e.into());
                    return;
                }
            }
        }
    }

    fn on_timer(&mut self) {
        let now = Instant::now();
        let Some(link) = self.link.as_mut() else {
            return;
        };
        if now >= link.last_frame + LINK_TIMEOUT {
            self.close_link(LinkClosed::Timeout);
            return;
        }
        if now >= link.next_health {
            link.next_health = now + HEALTH_INTERVAL;
            if let Err(reason) = link.send(&Message::Health) {
                self.close_link(reason);
            }
        }
    }

    fn close_link(&mut self, reason: LinkClosed) {
        if self.link.take().is_some() {
            self.push_event(Event::Disconnected { reason });
        }
    }

    /// Hands a frame's event to the game at once when nothing waits before it and the channel
    /// has room, the usual case: queued, it would take the loop another turn (every branch
    /// polled again) to send it.
    fn deliver(&mut self, event: Event, events: &mpsc::Sender<Event>) {
        if self.events_closed || !self.pending.is_empty() {
            return self.push_event(event);
        }
        match events.try_send(event) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(event)) => self.pending.push_back(event),
            Err(mpsc::error::TrySendError::Closed(_)) => self.events_closed = true,
        }
    }

    fn push_event(&mut self, event: Event) {
        if self.events_closed {
            return;
        }
        // Rejections are only informational; when the game is already behind they would be
        // the one thing that lets a connection flood grow the queue.
        if matches!(event, Event::Rejected { .. }) && !self.pending.is_empty() {
            return;
        }
        self.pending.push_back(event);
    }
}

/// The handshake of ARCUS.md §2: our hello first, then exactly the 12-byte reply.
async fn handshake(stream: TcpStream) -> Result<TcpStream, HandshakeError> {
    // A real syscall, not tokio's cached readiness: bytes that arrived before we said hello
    // mean the peer spoke first, which the protocol forbids.
    let std_stream = stream.into_std()?;
    let mut probe = [0u8; HEADER_LEN];
    match std_stream.peek(&mut probe) {
        Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
        Ok(n) => return Err(ArcusError::SpokeFirst(n).into()),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
        Err(e) => return Err(e.into()),
    }
    let mut stream = TcpStream::from_std(std_stream)?;
    // Frames are small and latency matters more than packet count (a status update should not
    // wait for a delayed ACK).
    stream.set_nodelay(true)?;
    let exchange = async {
        stream.write_all(&HELLO).await?;
        // Read piecewise so a wrong first byte closes the connection at once instead of
        // waiting out the timeout for 12 bytes that can no longer be right.
        let mut reply = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            let n = stream.read(&mut reply[got..]).await?;
            if n == 0 {
                return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
            }
            got += n;
            if reply[..got] != HELLO_REPLY[..got] {
                return Err(ArcusError::BadHelloReply {
                    got: reply[..got].to_vec(),
                }
                .into());
            }
        }
        arcus::check_hello_reply(&reply)?;
        Ok::<(), HandshakeError>(())
    };
    timeout(HELLO_REPLY_TIMEOUT, exchange)
        .await
        .map_err(|_| HandshakeError::Timeout)??;
    Ok(stream)
}

fn event_for(frame: Frame) -> Option<Event> {
    let Frame::Message { message, .. } = frame else {
        return None;
    };
    Some(match message {
        Message::SoftStop { timeout } => Event::SoftStop { timeout },
        Message::Metadata(data) => Event::Metadata(data),
        Message::CustomCommand(data) => Event::CustomCommand(data),
        Message::HostInformation(info) => Event::HostInformation(info),
        Message::Allocated(data) => Event::Allocated(data),
        Message::InstanceInformation(info) => Event::InstanceInformation(info),
        // Health only feeds the link timeout; a late hello reply is ignored (ARCUS.md §4).
        Message::Health | Message::HelloReply => return None,
        // A `Role::Game` decoder yields game-sent opcodes as `Frame::Ignored`; listed so the
        // match stays exhaustive if that ever changes.
        Message::LiveState(_) | Message::ReverseMetadata(_) | Message::InstanceStatus { .. } => {
            return None;
        }
    })
}

/// Reads what the socket holds without waiting. A read that leaves part of the buffer unused
/// took everything there was, so the socket's readiness is cleared with it; otherwise tokio
/// keeps the socket readable until a read fails with `WouldBlock`, which costs every frame a
/// second `recv`. Data that arrives after the read raises a new edge and readiness again (the
/// clear only applies to the readiness the read saw), as in tokio's own `poll_read`.
fn read_available(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    let read = stream.try_io(Interest::READABLE, || {
        got = stream.try_read(buf)?;
        if got > 0 && got < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(())
        }
    });
    match read {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        Err(e) => Err(e),
        Ok(()) => Ok(got),
    }
}

async fn readable(link: Option<&Link>) -> io::Result<()> {
    match link {
        Some(link) => link.stream.readable().await,
        None => future::pending().await,
    }
}

async fn writable(link: Option<&Link>) -> io::Result<()> {
    match link {
        Some(link) => link.stream.writable().await,
        None => future::pending().await,
    }
}
