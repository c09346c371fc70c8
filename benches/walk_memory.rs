//! Memory of a whole-account walk: bytes allocated while answering a 25-page account from a warm
//! cache, against the size of the pages the cache already holds. The merged document is built
//! from slices of the cached pages, so the answer should allocate a small fraction of them.
//!
//! Run: cargo bench --bench walk_memory

mod common;

use http::Request;
use http_body_util::BodyExt;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use thingspace_gateway::respond::Body;

/// Counts bytes allocated (not freed) so a run can be measured.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only adds a counter.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATED.fetch_add(new_size.saturating_sub(layout.size()), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (sim, gw) = common::gateway_over_sim(1, 25_000).await;
        let api = gw.client_api();
        let path = format!("/gateway/v1/accounts/{}/licenses", sim.account_names()[0]);
        let walk = || {
            api.serve(
                Request::get(path.as_str())
                    .body(Body::default())
                    .expect("req"),
            )
        };
        // The first walk fills the cache.
        let first = walk().await;
        assert_eq!(first.status(), 200);
        let len = first
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes()
            .len();
        let (_, cached) = gw.cache().size().await;
        let mut per_walk = Vec::new();
        for _ in 0..5 {
            let before = ALLOCATED.load(Ordering::Relaxed);
            let resp = walk().await;
            let chunks = resp.body().chunks().count();
            let after = ALLOCATED.load(Ordering::Relaxed);
            drop(resp);
            per_walk.push((after - before, chunks));
        }
        per_walk.sort();
        let (median, chunks) = per_walk[per_walk.len() / 2];
        println!(
            "walk of 25 pages: document {len} bytes in {chunks} chunks; cache holds {cached} bytes"
        );
        println!(
            "allocated per warm walk (median of 5): {median} bytes = {:.1}% of the document",
            100.0 * median as f64 / len as f64
        );
    });
}
