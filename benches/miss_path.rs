//! Criterion benches of the miss path's own work at ~8 KB (100 devices) and ~80 KB (1000
//! devices) pages as the simulator renders them: what the first answer waits for (check that
//! the body is a JSON object, build the entry: exact-size copy and SHA-256 ETag, store it through
//! the single-flight into the moka store), and what is done after it, off the async workers
//! (gzip). `cargo bench --bench miss_path`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::StatusCode;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thingspace_gateway::cache::{
    clock, gzip_parts, Entry, FillOptions, Key, Kind, MemStore, PageCache, Want, Windows,
};
use thingspace_gateway::upstream::is_json_object;

/// A ~8 KB and a ~80 KB license page.
fn pages() -> Vec<(&'static str, Bytes)> {
    // Two accounts: the simulator keeps one rendering per account and offset.
    let accounts = thingspace_sim::data::generate(2, 1000, 1);
    vec![
        ("8KB", accounts[0].page(0, 100, None)),
        ("80KB", accounts[1].page(0, 1000, None)),
    ]
}

fn windows() -> Windows {
    Windows {
        ttl: Duration::from_secs(300),
        negative_ttl: Duration::from_secs(30),
        stale_while_revalidate: Duration::from_secs(60),
        stale_if_error: Duration::from_secs(3600),
    }
}

fn check(c: &mut Criterion) {
    let mut g = c.benchmark_group("miss_check");
    for (size, body) in pages() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("serde_ignored_any", size),
            &body,
            |b, body| {
                b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body)).is_ok())
            },
        );
        g.bench_with_input(BenchmarkId::new("scan", size), &body, |b, body| {
            b.iter(|| is_json_object(black_box(body)))
        });
    }
    g.finish();
}

fn answer(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let cache = PageCache::new(
        Arc::new(MemStore::new(256 << 20, windows())),
        256 << 20,
        windows(),
    );
    let next = AtomicU64::new(0);
    let mut g = c.benchmark_group("miss_answer");
    for (size, body) in pages() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(BenchmarkId::new("etag_sha256", size), &body, |b, body| {
            b.iter(|| ring::digest::digest(&ring::digest::SHA256, black_box(body)))
        });
        g.bench_with_input(
            BenchmarkId::new("entry_copy_etag", size),
            &body,
            |b, body| {
                b.iter(|| {
                    Entry::new(
                        StatusCode::OK,
                        thingspace_gateway::respond::JSON,
                        black_box(body.clone()),
                        clock::now(),
                    )
                })
            },
        );
        // Everything between the body read and the answer: check, entry, store (through the
        // single-flight, into moka), each time under a new key.
        g.bench_with_input(
            BenchmarkId::new("check_entry_store", size),
            &body,
            |b, body| {
                b.to_async(&rt).iter(|| async {
                    let body = body.clone();
                    let key = Key {
                        kind: Kind::Page,
                        account: "0402196254-00001".into(),
                        index: next.fetch_add(1, Ordering::Relaxed),
                    };
                    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                    let options = FillOptions {
                        windows: windows(),
                        want: Want::Usable,
                        deadline,
                    };
                    let (entry, _) = cache
                        .fill(key, deadline, options, async move {
                            assert!(is_json_object(&body));
                            Ok(Arc::new(Entry::new(
                                StatusCode::OK,
                                thingspace_gateway::respond::JSON,
                                body,
                                clock::now(),
                            )))
                        })
                        .await;
                    black_box(entry.is_ok())
                })
            },
        );
    }
    g.finish();
}

fn after(c: &mut Criterion) {
    let mut g = c.benchmark_group("miss_after");
    for (size, body) in pages() {
        g.throughput(Throughput::Bytes(body.len() as u64));
        g.bench_with_input(
            BenchmarkId::new("gzip6_reused_state", size),
            &body,
            |b, body| b.iter(|| gzip_parts(&[black_box(body)])),
        );
        g.bench_with_input(
            BenchmarkId::new("gzip6_fresh_state", size),
            &body,
            |b, body| {
                b.iter(|| {
                    use std::io::Write;
                    let mut enc = flate2::write::GzEncoder::new(
                        Vec::with_capacity(body.len() / 4),
                        flate2::Compression::new(6),
                    );
                    enc.write_all(black_box(body)).expect("write");
                    enc.finish().expect("finish")
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, check, answer, after);
criterion_main!(benches);
