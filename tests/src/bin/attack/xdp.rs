//! `xdp`: hand-built SYNs through an AF_XDP socket in copy mode. Its frames
//! go from a ring in user memory to the driver (`__dev_direct_xmit`),
//! past the qdisc and tc egress, as PACKET_QDISC_BYPASS frames do. The
//! setup is the kernel's own, step by step: the frames' memory (UMEM), its
//! fill and completion rings, a TX ring, their mmaps, then bind to one
//! queue of the interface. Each step's refusal is the report's to give.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::json;

use super::{interface_mac, ipv4_tcp, TcpPacket, ETHERTYPE_IPV4, MIN_FRAME, SYN};

/// UMEM frames, each one chunk of FRAME_SIZE bytes.
const FRAMES: usize = 16;
const FRAME_SIZE: usize = 4096;
/// Entries of every ring (a power of two).
const RING_SIZE: u32 = 16;
/// How long frames may wait for room, and then for their completions.
const SEND_TIME: Duration = Duration::from_secs(5);
const COMPLETION_TIME: Duration = Duration::from_secs(1);
/// How long a busy queue is waited for (see `bind`).
const BIND_BUSY_TIME: Duration = Duration::from_secs(2);

/// What `xdp` got done; it becomes the JSON report. The first error set
/// is the step that stopped it, except `kick_error`: a failed sendto() is
/// noted and the sending goes on.
#[derive(Default)]
struct XdpReport {
    socket_error: Option<String>,
    /// The first setsockopt() refused, with its option's name.
    setsockopt_error: Option<String>,
    /// XDP_MMAP_OFFSETS or an mmap() of the UMEM or a ring failed.
    mmap_error: Option<String>,
    bind_error: Option<String>,
    kick_error: Option<String>,
    /// Descriptors handed to the kernel in the TX ring.
    sent: u32,
    /// Descriptors the kernel gave back in the completion ring.
    completed: u32,
}

/// Sends `count` SYNs from `src` (port random) to `dst`, in frames from
/// `iface`'s MAC to `dst_mac`, through queue 0 of `iface`.
pub(super) fn xdp(
    iface: &str,
    dst_mac: [u8; 6],
    src: Ipv4Addr,
    dst: SocketAddrV4,
    count: u32,
) -> anyhow::Result<serde_json::Value> {
    let ifindex =
        nix::net::if_::if_nametoindex(iface).with_context(|| format!("no interface {iface}"))?;
    let src_mac = interface_mac(iface)?;
    let frame = || {
        let packet = ipv4_tcp(&TcpPacket {
            src: SocketAddrV4::new(src, fastrand::u16(32768..61000)),
            dst,
            seq: fastrand::u32(..),
            ack: 0,
            flags: SYN,
            options: &[2, 4, 0x05, 0xb4],
            payload: &[],
        });
        let mut frame = Vec::with_capacity(MIN_FRAME.max(14 + packet.len()));
        frame.extend_from_slice(&dst_mac);
        frame.extend_from_slice(&src_mac);
        frame.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        frame.extend_from_slice(&packet);
        frame.resize(frame.len().max(MIN_FRAME), 0);
        frame
    };
    let mut report = XdpReport::default();
    transmit(&mut report, ifindex, frame, count);
    Ok(json!({
        "mode": "xdp",
        "socket_error": report.socket_error,
        "setsockopt_error": report.setsockopt_error,
        "mmap_error": report.mmap_error,
        "bind_error": report.bind_error,
        "kick_error": report.kick_error,
        "sent": report.sent,
        "completed": report.completed,
    }))
}

/// The steps, each stopping the run with its error in `report`.
fn transmit(report: &mut XdpReport, ifindex: u32, mut frame: impl FnMut() -> Vec<u8>, count: u32) {
    // SAFETY: socket() takes no pointers.
    let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        report.socket_error = Some(nix::Error::last().to_string());
        return;
    }
    // SAFETY: `raw` is a socket just opened, owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };

    let umem = match Mapping::new(FRAMES * FRAME_SIZE, None) {
        Ok(umem) => umem,
        Err(e) => {
            report.mmap_error = Some(format!("UMEM: {e}"));
            return;
        }
    };
    let umem_reg = libc::xdp_umem_reg {
        addr: umem.ptr.as_ptr() as u64,
        len: umem.len as u64,
        chunk_size: FRAME_SIZE as u32,
        headroom: 0,
        flags: 0,
        tx_metadata_len: 0,
    };
    if let Err(e) = register(&fd, &umem_reg) {
        report.setsockopt_error = Some(e);
        return;
    }

    // The rings can only be mapped before bind().
    let rings = mmap_offsets(&fd).and_then(|offsets| {
        let tx = Ring::map(
            &fd,
            &offsets.tx,
            std::mem::size_of::<libc::xdp_desc>(),
            libc::XDP_PGOFF_TX_RING,
        )
        .map_err(|e| format!("TX ring: {e}"))?;
        let completion = Ring::map(
            &fd,
            &offsets.cr,
            std::mem::size_of::<u64>(),
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
        )
        .map_err(|e| format!("completion ring: {e}"))?;
        Ok((tx, completion))
    });
    let (tx, completion) = match rings {
        Ok(rings) => rings,
        Err(e) => {
            report.mmap_error = Some(e);
            return;
        }
    };

    if let Err(e) = bind(&fd, ifindex) {
        report.bind_error = Some(e.to_string());
        return;
    }

    // The UMEM chunks not in the kernel's hands.
    let mut free: Vec<u64> = (0..FRAMES).map(|i| (i * FRAME_SIZE) as u64).collect();
    let reclaim = |free: &mut Vec<u64>, report: &mut XdpReport| {
        let done = completion.consume();
        report.completed += done.len() as u32;
        free.extend(done);
    };
    let send_until = Instant::now() + SEND_TIME;
    while report.sent < count && Instant::now() < send_until {
        reclaim(&mut free, report);
        let batch = tx.room().min(free.len() as u32).min(count - report.sent);
        let producer = tx.producer().load(Ordering::Relaxed);
        for i in 0..batch {
            let chunk = free.pop().expect("batch is at most the free chunks");
            let frame = frame();
            let len = frame.len().min(FRAME_SIZE);
            umem.write(chunk as usize, &frame[..len]);
            tx.write_desc(
                producer.wrapping_add(i),
                libc::xdp_desc {
                    addr: chunk,
                    len: len as u32,
                    options: 0,
                },
            );
        }
        // Release: the kernel reads the descriptors (and the frames) only
        // after it sees the producer move.
        tx.producer()
            .store(producer.wrapping_add(batch), Ordering::Release);
        report.sent += batch;
        if tx.room() < RING_SIZE {
            kick(&fd, report);
        }
        if batch == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let complete_until = Instant::now() + COMPLETION_TIME;
    while report.completed < report.sent && Instant::now() < complete_until {
        reclaim(&mut free, report);
        if tx.room() < RING_SIZE {
            kick(&fd, report); // descriptors still waiting in the TX ring
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Binds `fd` to queue 0 of `ifindex` in copy mode. The kernel lets go of
/// a closed socket's queue only after a deferred release, so a run right
/// after another can find the queue busy for a moment: EBUSY is retried
/// for up to BIND_BUSY_TIME.
fn bind(fd: &OwnedFd, ifindex: u32) -> nix::Result<()> {
    let addr = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: libc::XDP_COPY,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: 0,
        sxdp_shared_umem_fd: 0,
    };
    let give_up = Instant::now() + BIND_BUSY_TIME;
    loop {
        // SAFETY: `addr` is a valid sockaddr_xdp that outlives the call,
        // and the length passed is its size.
        let bound = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
            )
        };
        match nix::Error::result(bound) {
            Err(nix::Error::EBUSY) if Instant::now() < give_up => {
                std::thread::sleep(Duration::from_millis(50));
            }
            result => return result.map(drop),
        }
    }
}

/// Tells the kernel to transmit what is in the TX ring; in copy mode it
/// does so only here. The first failure is noted.
fn kick(fd: &OwnedFd, report: &mut XdpReport) {
    // SAFETY: a zero-length send with no buffer and no address reads no
    // memory.
    let sent = unsafe {
        libc::sendto(
            fd.as_raw_fd(),
            std::ptr::null(),
            0,
            libc::MSG_DONTWAIT,
            std::ptr::null(),
            0,
        )
    };
    if sent < 0 {
        report
            .kick_error
            .get_or_insert_with(|| nix::Error::last().to_string());
    }
}

/// Registers the UMEM and sizes its rings and the TX ring, in order; the
/// first refusal stops the rest and is returned with the option's name.
fn register(fd: &OwnedFd, umem_reg: &libc::xdp_umem_reg) -> Result<(), String> {
    let named = |name: &'static str| move |e: nix::Error| format!("{name}: {e}");
    set_option(fd, libc::XDP_UMEM_REG, umem_reg).map_err(named("XDP_UMEM_REG"))?;
    let ring_size = RING_SIZE as libc::c_int;
    for (name, option) in [
        ("XDP_UMEM_FILL_RING", libc::XDP_UMEM_FILL_RING),
        ("XDP_UMEM_COMPLETION_RING", libc::XDP_UMEM_COMPLETION_RING),
        ("XDP_TX_RING", libc::XDP_TX_RING),
    ] {
        set_option(fd, option, &ring_size).map_err(named(name))?;
    }
    Ok(())
}

fn set_option<T>(fd: &OwnedFd, name: libc::c_int, value: &T) -> nix::Result<()> {
    // SAFETY: `value` is a valid T that outlives the call, and the length
    // passed is its size.
    let set = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            name,
            (value as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if set == 0 {
        Ok(())
    } else {
        Err(nix::Error::last())
    }
}

/// Where the producer, consumer and descriptors of each ring sit in its
/// mapping.
fn mmap_offsets(fd: &OwnedFd) -> Result<libc::xdp_mmap_offsets, String> {
    // SAFETY: xdp_mmap_offsets is plain old data, for which all zeroes is
    // a valid value.
    let mut offsets: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
    // SAFETY: `offsets` and `len` are valid and outlive the call, and
    // `len` is the size of `offsets`.
    let got = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_XDP,
            libc::XDP_MMAP_OFFSETS,
            (&raw mut offsets).cast(),
            &raw mut len,
        )
    };
    if got != 0 {
        return Err(format!("XDP_MMAP_OFFSETS: {}", nix::Error::last()));
    }
    if len as usize != std::mem::size_of::<libc::xdp_mmap_offsets>() {
        return Err(format!("XDP_MMAP_OFFSETS: {len} bytes (an older layout)"));
    }
    Ok(offsets)
}

/// A memory mapping, unmapped on drop.
struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

impl Mapping {
    /// Anonymous memory (`at` None), or `fd`'s pages at an offset.
    fn new(len: usize, at: Option<(&OwnedFd, libc::off_t)>) -> nix::Result<Self> {
        let (flags, fd, offset) = match at {
            None => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0),
            Some((fd, offset)) => (
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                offset,
            ),
        };
        // SAFETY: a new mapping at an address of the kernel's choosing
        // touches no memory of ours.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                offset,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(nix::Error::last());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or(nix::Error::EINVAL)?;
        Ok(Self { ptr, len })
    }

    /// Copies `data` in at `offset`.
    fn write(&self, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= self.len, "write past the mapping");
        // SAFETY: the range is inside the mapping (checked above), which
        // is writable and not aliased by any Rust reference.
        unsafe {
            self.ptr
                .as_ptr()
                .add(offset)
                .copy_from_nonoverlapping(data.as_ptr(), data.len());
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours, and nothing points into it past
        // its owner's life.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One ring shared with the kernel: a producer and a consumer index and
/// RING_SIZE entries of `entry` bytes.
struct Ring {
    map: Mapping,
    producer: usize,
    consumer: usize,
    desc: usize,
    entry: usize,
}

impl Ring {
    fn map(
        fd: &OwnedFd,
        offsets: &libc::xdp_ring_offset,
        entry: usize,
        page_offset: libc::off_t,
    ) -> nix::Result<Self> {
        let desc = offsets.desc as usize;
        let len = desc + RING_SIZE as usize * entry;
        let ring = Self {
            map: Mapping::new(len, Some((fd, page_offset)))?,
            producer: offsets.producer as usize,
            consumer: offsets.consumer as usize,
            desc,
            entry,
        };
        // The indices are read in place as atomics.
        let fits = |at: usize| at.is_multiple_of(4) && at + 4 <= len;
        if !fits(ring.producer) || !fits(ring.consumer) || !desc.is_multiple_of(8) {
            return Err(nix::Error::EINVAL);
        }
        Ok(ring)
    }

    fn index(&self, offset: usize) -> &AtomicU32 {
        // SAFETY: `offset` is 4-aligned and inside the mapping (checked in
        // `map`), which lives as long as `self`; the kernel updates the
        // index concurrently, hence an atomic.
        unsafe { &*self.map.ptr.as_ptr().add(offset).cast::<AtomicU32>() }
    }

    fn producer(&self) -> &AtomicU32 {
        self.index(self.producer)
    }

    fn consumer(&self) -> &AtomicU32 {
        self.index(self.consumer)
    }

    /// Free entries, for the ring we produce into (TX).
    fn room(&self) -> u32 {
        let producer = self.producer().load(Ordering::Relaxed);
        let consumer = self.consumer().load(Ordering::Acquire);
        RING_SIZE - producer.wrapping_sub(consumer)
    }

    /// Puts a descriptor in the TX ring at `index` (not yet published).
    fn write_desc(&self, index: u32, desc: libc::xdp_desc) {
        assert_eq!(self.entry, std::mem::size_of::<libc::xdp_desc>());
        let slot = self.desc + (index % RING_SIZE) as usize * self.entry;
        // SAFETY: the slot is inside the mapping (it was sized for
        // RING_SIZE entries) and 8-aligned; the kernel does not read it
        // before the producer index moves past it.
        unsafe {
            self.map
                .ptr
                .as_ptr()
                .add(slot)
                .cast::<libc::xdp_desc>()
                .write(desc);
        }
    }

    /// Takes every address the kernel has put in the completion ring.
    fn consume(&self) -> Vec<u64> {
        assert_eq!(self.entry, std::mem::size_of::<u64>());
        let producer = self.producer().load(Ordering::Acquire);
        let consumer = self.consumer().load(Ordering::Relaxed);
        let done: Vec<u64> = (0..producer.wrapping_sub(consumer))
            .map(|i| {
                let slot = self.desc + (consumer.wrapping_add(i) % RING_SIZE) as usize * self.entry;
                // SAFETY: the slot is inside the mapping and 8-aligned,
                // and the kernel wrote it before moving the producer
                // (Acquire above).
                unsafe { self.map.ptr.as_ptr().add(slot).cast::<u64>().read() }
            })
            .collect();
        self.consumer().store(producer, Ordering::Release);
        done
    }
}
