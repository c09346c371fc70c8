//! Criterion benches of the hot functions: routing and validation, the cache-hit request path
//! (key → lookup → response with headers), response building alone, the token read, and the
//! whole-account endpoints over a warm 200-page account.

mod common;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use http::{Method, Request};
use std::hint::black_box;
use std::sync::Arc;
use thingspace_gateway::api::route::route;
use thingspace_gateway::api::ClientApi;
use thingspace_gateway::respond::Body;
use thingspace_gateway::runtime::Gateway;
use thingspace_sim::Simulator;

fn routing(c: &mut Criterion) {
    let mut g = c.benchmark_group("route");
    for (name, path) in [
        (
            "license_page",
            "/api/fota/v1/licenses/0402196254-00001/index/366379200822499",
        ),
        (
            "device_lookup",
            "/gateway/v1/accounts/0402196254-00001/licenses/366379200822499",
        ),
        ("hostile", "/api/fota/v1/licenses/%2e%2e/index/0"),
        ("unknown", "/wp-admin/setup.php"),
    ] {
        g.bench_function(name, |b| {
            b.iter(|| route(black_box(&Method::GET), black_box(path)))
        });
    }
    g.finish();
}

struct Fixture {
    _sim: Simulator,
    gw: Arc<Gateway>,
    api: ClientApi,
    paths: Vec<(usize, String)>,
}

async fn fixture() -> Fixture {
    let (sim, gw) = common::gateway_over_sim(2, 2500).await;
    let api = gw.client_api();
    let names = sim.account_names();
    let imeis = sim.imeis(&names[0]);
    // A full 1000-device page (~80 KB) and the 100-device tail page of the account (~8 KB).
    let paths = vec![
        (1000, format!("/api/fota/v1/licenses/{}/index/0", names[0])),
        (
            100,
            format!("/api/fota/v1/licenses/{}/index/{}", names[0], imeis[2399]),
        ),
    ];
    for (_, p) in &paths {
        let resp = api
            .serve(Request::get(p.as_str()).body(Body::default()).expect("req"))
            .await;
        assert_eq!(resp.status(), 200);
        // The gzip form is made after the first answer, off the async workers: wait for it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let gz = api
                .serve(
                    Request::get(p.as_str())
                        .header("accept-encoding", "gzip")
                        .body(Body::default())
                        .expect("req"),
                )
                .await;
            if gz.headers().contains_key("content-encoding") {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no gzip form");
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
    }
    Fixture {
        _sim: sim,
        gw,
        api,
        paths,
    }
}

fn hit_path(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let f = rt.block_on(fixture());
    let mut g = c.benchmark_group("cache_hit");
    for (devices, path) in &f.paths {
        for gzip in [false, true] {
            let id = BenchmarkId::new(
                if gzip { "gzip" } else { "identity" },
                format!("{devices}_devices"),
            );
            g.throughput(Throughput::Elements(1));
            g.bench_with_input(id, path, |b, path| {
                b.to_async(&rt).iter(|| async {
                    let mut req = Request::get(path.as_str());
                    if gzip {
                        req = req.header("accept-encoding", "gzip");
                    }
                    let resp = f.api.serve(req.body(Body::default()).expect("req")).await;
                    black_box(resp)
                })
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("tokens");
    g.bench_function("credentials_when_held", |b| {
        b.to_async(&rt).iter(|| async {
            let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
            black_box(f.gw.tokens().credentials(deadline).await.expect("creds"))
        })
    });
    g.finish();
    // A real 1000-device page, as the simulator renders it.
    let page = thingspace_sim::data::generate(1, 1000, 1);
    let body = page[0].page(0, 1000, None);
    let mut g = c.benchmark_group("entry");
    // What a miss builds before answering (exact-size copy and ETag); gzip is made after, see
    // benches/miss_path.rs.
    g.bench_function("build_80KB_page_copy_and_etag", |b| {
        b.iter(|| {
            black_box(thingspace_gateway::cache::Entry::new(
                http::StatusCode::OK,
                thingspace_gateway::respond::JSON,
                body.clone(),
                thingspace_gateway::cache::clock::now(),
            ))
        })
    });
    g.finish();
}

/// A warm whole-account walk and device lookups over a 200-page account (200,000 devices, ~16 MB
/// of cached pages): the per-request cost of the walk itself, the pages already cached.
fn walks(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let (sim, gw) = rt.block_on(common::gateway_over_sim(1, 200_000));
    let api = gw.client_api();
    let account = sim.account_names()[0].clone();
    let imeis = sim.imeis(&account);
    let serve = |path: String| {
        let api = &api;
        async move {
            api.serve(
                Request::get(path.as_str())
                    .body(Body::default())
                    .expect("req"),
            )
            .await
        }
    };
    let walk = format!("/gateway/v1/accounts/{account}/licenses");
    // The first walk fills the cache.
    assert_eq!(rt.block_on(serve(walk.clone())).status(), 200);
    let mut g = c.benchmark_group("walk_200_pages");
    g.bench_function("whole_account", |b| {
        b.to_async(&rt)
            .iter(|| async { black_box(serve(walk.clone()).await) })
    });
    for (name, imei) in [
        (
            "device_lookup_last_page",
            imeis[imeis.len() - 1].to_string(),
        ),
        ("device_lookup_absent", "1".to_string()),
    ] {
        let path = format!("/gateway/v1/accounts/{account}/licenses/{imei}");
        assert_eq!(rt.block_on(serve(path.clone())).status(), 200);
        g.bench_function(name, |b| {
            b.to_async(&rt)
                .iter(|| async { black_box(serve(path.clone()).await) })
        });
    }
    g.finish();
}

criterion_group!(benches, routing, hit_path, walks);
criterion_main!(benches);
