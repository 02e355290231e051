//! How ring neighbours move bytes: over their TCP connection, or, when both run on one host,
//! through a shared-memory segment with the TCP connection carrying only the control messages.
//!
//! A shared-memory link is offered after the TCP admission (hello, token proof: written once in
//! `collective.rs`, for both transports): the sender creates `/dev/shm/tandem-ring-<128 random
//! bits>` (mode 0600, never an existing file), its pages written once so that a full tmpfs is an
//! error here instead of a SIGBUS later, and names it over TCP; the receiver maps it read-only if
//! it can (another host, container or user cannot, and the link stays TCP) and answers; the
//! sender then unlinks the name, so nothing is left behind once both have it mapped.
//!
//! Data moves in pieces of [`SLOT_BYTES`] through [`SLOTS`] slots: the sender copies a piece into
//! the next slot and sends its length over TCP; the receiver, holding that header, uses the slot
//! in place (the ring adds straight from it) and acknowledges it with one byte; the sender reuses
//! a slot only after its acknowledgement, and every exchange ends with all slots acknowledged.
//! Because every wait is a read on the TCP connection, the transport has the TCP ring's
//! deadlines (the connection's read timeout), its failure behaviour (a dead peer closes the
//! connection; `RingHandle::shutdown` breaks a blocked exchange) and its determinism (the same
//! floats, added in the same order).

#![allow(unsafe_code)] // the shared mapping: each block says why it is sound

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{fence, Ordering};

use job::config::RingTransport;

/// Slots of one link's segment: the sender can be this many pieces ahead of the receiver.
pub const SLOTS: usize = 4;
/// The size of one piece (a multiple of 64, so that every slot is aligned for f32 and cache lines).
pub const SLOT_BYTES: usize = 1 << 20;
const SEGMENT_BYTES: usize = SLOTS * SLOT_BYTES;
const PREFIX: &str = "tandem-ring-";
const SHM_DIR: &str = "/dev/shm";

fn bad_peer(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

/// The sending end of a link: the TCP connection to the successor and, when offered and taken,
/// the segment this rank writes.
pub struct Outgoing {
    tcp: TcpStream,
    shm: Option<memmap2::MmapRaw>,
}

/// The receiving end: the TCP connection from the predecessor, its segment when shared, and a
/// buffer for what arrives over TCP.
pub struct Incoming {
    tcp: TcpStream,
    shm: Option<memmap2::MmapRaw>,
    buf: Vec<f32>,
}

/// A segment this rank created: its name is unlinked when this drops (the mapping, once taken
/// out, stays valid).
struct Created {
    path: PathBuf,
    map: Option<memmap2::MmapRaw>,
}

impl Drop for Created {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn create_segment() -> std::io::Result<(String, Created)> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut id = [0u8; 16];
    getrandom::fill(&mut id).map_err(|e| std::io::Error::other(format!("random segment name: {e}")))?;
    let name = format!("{PREFIX}{}", id.iter().map(|b| format!("{b:02x}")).collect::<String>());
    let path = PathBuf::from(SHM_DIR).join(&name);
    let mut file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).mode(0o600).open(&path)?;
    let mut created = Created { path, map: None };
    file.write_all(&vec![0u8; SEGMENT_BYTES])?;
    let map = memmap2::MmapRaw::map_raw(&file)?;
    if map.len() != SEGMENT_BYTES {
        return Err(std::io::Error::other("the segment mapped at the wrong size"));
    }
    created.map = Some(map);
    Ok((name, created))
}

fn open_segment(name: &str) -> std::io::Result<memmap2::MmapRaw> {
    let hex = name.strip_prefix(PREFIX).unwrap_or("");
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(bad_peer(format!("offered a segment with an odd name {name:?}")));
    }
    let file = std::fs::File::open(PathBuf::from(SHM_DIR).join(name))?;
    let len = file.metadata()?.len();
    if len != SEGMENT_BYTES as u64 {
        return Err(bad_peer(format!("offered a segment of {len} bytes, not {SEGMENT_BYTES}")));
    }
    let map = memmap2::MmapOptions::new().map_raw_read_only(&file)?;
    if map.len() != SEGMENT_BYTES {
        return Err(std::io::Error::other("the segment mapped at the wrong size"));
    }
    Ok(map)
}

/// Sets up both links of a rank once its neighbours are admitted: offers a segment to the
/// successor (`next`), answers the predecessor's offer (`prev`), then reads the successor's
/// answer. Each rank writes before it reads, so the ring cannot deadlock here. With
/// [`RingTransport::Tcp`] nothing is offered or taken.
pub fn negotiate(
    mut next: TcpStream,
    mut prev: TcpStream,
    transport: RingTransport,
) -> std::io::Result<(Outgoing, Incoming)> {
    let offer = match transport {
        RingTransport::Auto => match create_segment() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::info!(error = %e, "no shared-memory segment for the ring (it stays TCP)");
                None
            }
        },
        RingTransport::Tcp => None,
    };
    let msg = match &offer {
        Some((name, _)) => [&[1, name.len() as u8][..], name.as_bytes()].concat(),
        None => vec![0],
    };
    next.write_all(&msg)?;

    let mut flag = [0u8; 1];
    prev.read_exact(&mut flag)?;
    let taken = match flag[0] {
        0 => None,
        1 => {
            let mut len = [0u8; 1];
            prev.read_exact(&mut len)?;
            let mut name = vec![0u8; usize::from(len[0])];
            prev.read_exact(&mut name)?;
            let name =
                String::from_utf8(name).map_err(|_| bad_peer("offered a segment name that is not UTF-8".into()))?;
            match transport {
                RingTransport::Tcp => None,
                RingTransport::Auto => match open_segment(&name) {
                    Ok(map) => Some(map),
                    Err(e) if e.kind() == std::io::ErrorKind::InvalidData => return Err(e),
                    // Another host, container or user: TCP.
                    Err(_) => None,
                },
            }
        }
        other => return Err(bad_peer(format!("sent {other} where a shared-memory offer (0 or 1) was due"))),
    };
    prev.write_all(&[u8::from(taken.is_some())])?;

    let mut answer = [0u8; 1];
    next.read_exact(&mut answer)?;
    let shm = match (offer, answer[0]) {
        // Both ends have it mapped: the name goes (as `created` drops), the mapping stays.
        (Some((_, mut created)), 1) => created.map.take(),
        (_, 0) => None,
        (None, _) => return Err(bad_peer("accepted a shared-memory segment that was not offered".into())),
        (Some(_), other) => return Err(bad_peer(format!("answered {other} to a shared-memory offer"))),
    };
    Ok((Outgoing { tcp: next, shm }, Incoming { tcp: prev, shm: taken, buf: Vec::new() }))
}

impl Outgoing {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn shared_memory(&self) -> bool {
        self.shm.is_some()
    }

    /// Sends `data` to the successor, which must be receiving as many floats.
    pub fn send(&mut self, data: &[f32]) -> std::io::Result<()> {
        let bytes: &[u8] = bytemuck::cast_slice(data);
        let Some(map) = &self.shm else {
            return self.tcp.write_all(bytes);
        };
        let mut unacked = 0;
        for (k, piece) in bytes.chunks(SLOT_BYTES).enumerate() {
            if unacked == SLOTS {
                read_ack(&mut self.tcp)?;
                unacked -= 1;
            }
            // SAFETY: slot k % SLOTS lies inside the mapping (SEGMENT_BYTES = SLOTS * SLOT_BYTES,
            // a piece is at most SLOT_BYTES), and this rank owns it: it has never been handed
            // over in this exchange, or its acknowledgement has been read (at most SLOTS
            // unacknowledged pieces). The receiver does not touch it until the header below.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    piece.as_ptr(),
                    map.as_mut_ptr().add((k % SLOTS) * SLOT_BYTES),
                    piece.len(),
                );
            }
            fence(Ordering::Release);
            self.tcp.write_all(&(piece.len() as u64).to_le_bytes())?;
            unacked += 1;
        }
        for _ in 0..unacked {
            read_ack(&mut self.tcp)?;
        }
        Ok(())
    }
}

fn read_ack(tcp: &mut TcpStream) -> std::io::Result<()> {
    let mut ack = [0u8; 1];
    tcp.read_exact(&mut ack)?;
    match ack[0] {
        1 => Ok(()),
        other => Err(bad_peer(format!("acknowledged a piece with {other}, not 1"))),
    }
}

impl Incoming {
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }

    pub fn shared_memory(&self) -> bool {
        self.shm.is_some()
    }

    /// Receives `len` floats from the predecessor, handing them to `consume(offset, floats)` in
    /// order, piece by piece.
    pub fn recv(&mut self, len: usize, mut consume: impl FnMut(usize, &[f32])) -> std::io::Result<()> {
        let Some(map) = &self.shm else {
            self.buf.resize(len, 0.0);
            self.tcp.read_exact(bytemuck::cast_slice_mut(&mut self.buf[..]))?;
            consume(0, &self.buf);
            return Ok(());
        };
        let total = len * 4;
        let (mut off, mut k) = (0usize, 0usize);
        while off < total {
            let mut header = [0u8; 8];
            self.tcp.read_exact(&mut header)?;
            let got = u64::from_le_bytes(header);
            let due = (total - off).min(SLOT_BYTES);
            if got != due as u64 {
                return Err(bad_peer(format!("sent a piece of {got} bytes where {due} were due: it is out of step")));
            }
            fence(Ordering::Acquire);
            // SAFETY: the slot lies inside the mapping (`due` <= SLOT_BYTES), is 64-byte aligned
            // (page-aligned mapping, SLOT_BYTES a multiple of 64) and holds `due / 4` floats, any
            // bits of which are a valid f32. The sender handed it over with the header just read
            // and does not write it again before our acknowledgement below; a peer that broke that
            // rule could change the values we add, as a peer sending wrong floats over TCP could;
            // one that shrank the file (only its creator, this job's user, can) would fault this
            // process, which that user could as well kill.
            let piece = unsafe {
                std::slice::from_raw_parts(map.as_ptr().add((k % SLOTS) * SLOT_BYTES).cast::<f32>(), due / 4)
            };
            consume(off / 4, piece);
            self.tcp.write_all(&[1])?;
            off += due;
            k += 1;
        }
        Ok(())
    }
}
