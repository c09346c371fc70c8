//! Gzip forms, made off the async workers and off the response path.
//!
//! A stored page gains its gzip form after its first answer went out: [`GzipSlot::request`]
//! queues the page on a small pool of compressor threads at the lowest CPU priority (nice 19 on
//! Linux, so they use the CPU the request path leaves; bounded: when the queue is full the page
//! is skipped and the next gzip request for it asks again), and the slot is filled when the
//! compression is done. Until then gzip clients get the identity body; nobody waits.
//!
//! Each compressor thread (and each thread that calls [`gzip_parts`]) keeps one deflate state and
//! resets it per body: a fresh state per page costs a ~300 KB allocation, its page faults and a
//! `memset`, more than compressing an 8 KB page.

use super::file::{FileForm, FILE_MIN};
use bytes::Bytes;
use flate2::{Compress, Compression, Crc, FlushCompress, Status};
use parking_lot::{Condvar, Mutex};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};

/// Bodies below this are not worth compressing.
pub const GZIP_MIN: usize = 256;
/// Pages waiting for a compressor; more are skipped (asked again by a later gzip request).
const QUEUE: usize = 512;
/// The gzip member header: no name, no time, OS unknown (what flate2's `GzEncoder` writes).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

thread_local! {
    /// This thread's deflate state (level 6), reset for each body.
    static DEFLATE: RefCell<Option<Compress>> = const { RefCell::new(None) };
}

/// Gzip of the concatenated parts (level 6), or `None` when small or not smaller.
pub fn gzip_parts(parts: &[&[u8]]) -> Option<Bytes> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len < GZIP_MIN {
        return None;
    }
    let out = DEFLATE.with(|cell| {
        let mut cell = cell.borrow_mut();
        let state = cell.get_or_insert_with(|| Compress::new(Compression::new(6), false));
        state.reset();
        let out = deflate(state, parts, len);
        if out.is_none() {
            // Whatever went wrong, the next body starts from a fresh state.
            *cell = None;
        }
        out
    })?;
    (out.len() < len).then(|| Bytes::from(out.into_boxed_slice()))
}

/// One gzip member of `parts` with a reset raw-deflate `state`.
fn deflate(state: &mut Compress, parts: &[&[u8]], len: usize) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(len / 4 + 64);
    out.extend_from_slice(&HEADER);
    let mut crc = Crc::new();
    let room = |out: &mut Vec<u8>| {
        if out.capacity() - out.len() < 64 {
            out.reserve(out.capacity().max(1024));
        }
    };
    for part in parts {
        crc.update(part);
        let mut input = *part;
        while !input.is_empty() {
            room(&mut out);
            let before = state.total_in();
            state
                .compress_vec(input, &mut out, FlushCompress::None)
                .ok()?;
            let used = usize::try_from(state.total_in() - before).ok()?;
            input = input.get(used..)?;
        }
    }
    loop {
        room(&mut out);
        if state
            .compress_vec(&[], &mut out, FlushCompress::Finish)
            .ok()?
            == Status::StreamEnd
        {
            break;
        }
    }
    out.extend_from_slice(&crc.sum().to_le_bytes());
    out.extend_from_slice(&crc.amount().to_le_bytes());
    Some(out)
}

/// Where an entry's gzip form lands once made. Shared with the queued job by a weak reference:
/// an entry dropped from the cache before its turn is not compressed.
#[derive(Debug, Default)]
pub struct GzipSlot {
    /// `Some(None)`: compressed, but not worth keeping (not smaller, or over the room counted
    /// for it in the entry's weight).
    form: OnceLock<Option<Bytes>>,
    /// A job for this slot is queued or running.
    queued: AtomicBool,
    /// The body's file form (large bodies only), made on the pool when a plaintext hit asks.
    file: OnceLock<Option<Arc<FileForm>>>,
    file_queued: AtomicBool,
}

impl GzipSlot {
    /// The gzip form, once made and kept.
    pub fn get(&self) -> Option<&Bytes> {
        self.form.get().and_then(Option::as_ref)
    }

    /// True once a compression has ended, kept or not.
    pub fn is_done(&self) -> bool {
        self.form.get().is_some()
    }

    /// The body's file form, once made.
    pub fn file(&self) -> Option<&Arc<FileForm>> {
        self.file.get().and_then(Option::as_ref)
    }

    /// Compresses `body` here and now, keeping the result if at most `room` bytes.
    pub fn fill(&self, body: &[u8], room: usize) {
        let gz = gzip_parts(&[body]).filter(|gz| gz.len() <= room);
        let _ = self.form.set(gz);
    }

    /// Makes the file form of a large `body` here and now.
    pub fn fill_file(&self, body: &[u8]) {
        if body.len() >= FILE_MIN {
            let _ = self.file.set(FileForm::new(body).map(Arc::new));
        }
    }

    /// Queues the compression of `body` on the compressor pool, unless done or queued already.
    pub fn request(self: &Arc<Self>, body: &Bytes, room: usize) {
        if !self.is_done() {
            self.queue(&self.queued, body, Make::Gzip { room });
        }
    }

    /// Queues the making of `body`'s file form on the pool, unless made or queued already.
    pub fn request_file(self: &Arc<Self>, body: &Bytes) {
        if body.len() >= FILE_MIN && self.file.get().is_none() {
            self.queue(&self.file_queued, body, Make::File);
        }
    }

    fn queue(self: &Arc<Self>, queued: &AtomicBool, body: &Bytes, make: Make) {
        if queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let job = Job {
            body: body.clone(),
            make,
            slot: Arc::downgrade(self),
        };
        if !pool().is_some_and(|pool| pool.push(job)) {
            // Skipped: the next request for this form asks again.
            queued.store(false, Ordering::Release);
        }
    }
}

struct Job {
    body: Bytes,
    make: Make,
    slot: Weak<GzipSlot>,
}

enum Make {
    /// The gzip form, kept if at most `room` bytes.
    Gzip {
        room: usize,
    },
    File,
}

/// Compression uses only CPU the request path leaves: on a machine with every core busy serving
/// (or a server pinned to one core) a compression in progress must not delay an answer.
fn lowest_priority() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::process::setpriority_process(None, 19) {
        tracing::debug!(error = %e, "cannot lower the gzip thread's priority");
    }
}

/// The compressor pool's queue: a plain mutex (held for a push or a pop, never while
/// compressing) and a condition variable. Not a channel: a bounded channel's sender spins and
/// yields while a receiver is half-way through taking a job, and with the receiver at nice 19
/// on the same core (a server pinned to one) that spin held a request up for 100 ms and more.
struct Pool {
    jobs: Mutex<VecDeque<Job>>,
    ready: Condvar,
}

impl Pool {
    /// Queues `job`; false when the queue is full.
    fn push(&self, job: Job) -> bool {
        let mut jobs = self.jobs.lock();
        if jobs.len() >= QUEUE {
            return false;
        }
        jobs.push_back(job);
        drop(jobs);
        self.ready.notify_one();
        true
    }

    fn pop(&self) -> Job {
        let mut jobs = self.jobs.lock();
        loop {
            if let Some(job) = jobs.pop_front() {
                return job;
            }
            self.ready.wait(&mut jobs);
        }
    }
}

/// The compressor pool, started on first use: half the cores, 1 to 4 threads. `None` if no
/// thread could be started (pages are then served identity only).
fn pool() -> Option<&'static Pool> {
    static POOL: OnceLock<Option<&'static Pool>> = OnceLock::new();
    *POOL.get_or_init(|| {
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get() / 2)
            .clamp(1, 4);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            jobs: Mutex::new(VecDeque::with_capacity(QUEUE)),
            ready: Condvar::new(),
        }));
        let mut started = 0;
        for i in 0..threads {
            let spawned = std::thread::Builder::new()
                .name(format!("gzip-{i}"))
                .spawn(move || {
                    lowest_priority();
                    loop {
                        let job = pool.pop();
                        if let Some(slot) = job.slot.upgrade() {
                            match job.make {
                                Make::Gzip { room } => slot.fill(&job.body, room),
                                Make::File => slot.fill_file(&job.body),
                            }
                        }
                    }
                });
            match spawned {
                Ok(_) => started += 1,
                Err(e) => tracing::warn!(error = %e, "cannot start a gzip thread"),
            }
        }
        (started > 0).then_some(pool)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(gz: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    #[test]
    fn parts_round_trip_with_a_reused_state() {
        let body: Vec<u8> = (0..3000)
            .flat_map(|i| format!("{{\"deviceId\":\"{i}\"}},").into_bytes())
            .collect();
        for _ in 0..3 {
            let gz = gzip_parts(&[&body[..10], &[], &body[10..5000], &body[5000..]]).unwrap();
            assert_eq!(gunzip(&gz), body);
            let mut d = flate2::read::MultiGzDecoder::new(&gz[..]);
            let mut out = Vec::new();
            d.read_to_end(&mut out).unwrap();
            assert_eq!(out, body, "one well-formed member");
        }
        assert!(gzip_parts(&[b"{}"]).is_none(), "too small");
        let mut rng = fastrand::Rng::with_seed(7);
        let noise: Vec<u8> = (0..4096).map(|_| rng.u8(..)).collect();
        assert!(gzip_parts(&[&noise]).is_none(), "not smaller");
    }

    #[test]
    fn a_slot_is_filled_by_the_pool_and_keeps_only_what_fits() {
        let body = Bytes::from(
            (0..2000)
                .flat_map(|i| format!("{{\"deviceId\":\"{i}\"}},").into_bytes())
                .collect::<Vec<u8>>(),
        );
        let slot = Arc::new(GzipSlot::default());
        slot.request(&body, body.len());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !slot.is_done() {
            assert!(std::time::Instant::now() < deadline, "never compressed");
            // Polled, not spun: the compressor runs at the lowest priority.
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(gunzip(slot.get().unwrap()), body);
        slot.request(&body, body.len());
        let tight = GzipSlot::default();
        tight.fill(&body, 10);
        assert!(tight.is_done() && tight.get().is_none(), "over its room");
    }
}
