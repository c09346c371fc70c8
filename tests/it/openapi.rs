//! `deploy/openapi.yaml` and the routers agree: every route the gateway knows is described, and
//! every described operation is answered by a route (not 404, not 405).

use crate::common::*;
use http::{Method, StatusCode};
use std::collections::BTreeSet;
use thingspace_gateway::admin::ADMIN_ROUTES;
use thingspace_gateway::api::route::{route, CLIENT_ROUTES};

/// `(path, METHOD)` of every operation, read from the file's `paths:` section.
fn described() -> BTreeSet<(String, String)> {
    let text = std::fs::read_to_string("deploy/openapi.yaml").unwrap();
    let mut ops = BTreeSet::new();
    let mut in_paths = false;
    let mut path = None;
    for line in text.lines() {
        if !line.starts_with(' ') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if ["get", "head", "post", "put", "patch", "delete"].contains(&m) {
                ops.insert((path.clone().unwrap(), m.to_uppercase()));
            }
        }
    }
    ops
}

fn known() -> BTreeSet<(String, String)> {
    CLIENT_ROUTES
        .iter()
        .chain(ADMIN_ROUTES.iter())
        .flat_map(|(p, methods)| methods.iter().map(move |m| (p.to_string(), m.to_string())))
        .collect()
}

fn fill(template: &str) -> String {
    template
        .replace("{account}", "0402196254-00001")
        .replace("{startIndex}", "0")
        .replace("{deviceId}", "990003425730535")
}

#[test]
fn description_and_router_list_the_same_operations() {
    let described = described();
    assert!(described.len() >= 20, "{described:?}");
    assert_eq!(described, known());
    // The client router maps each described client path to the route of that template.
    for (template, methods) in CLIENT_ROUTES {
        for m in methods {
            let r = route(&Method::from_bytes(m.as_bytes()).unwrap(), &fill(template)).unwrap();
            assert_eq!(r.template(), template);
        }
    }
}

#[tokio::test]
async fn every_described_admin_operation_is_answered() {
    let sim = start_sim(sim_opts()).await;
    let gw = start_gateway(config(&sim.base_url(), "")).await;
    for (template, methods) in ADMIN_ROUTES {
        for m in methods {
            let r = request(
                Method::from_bytes(m.as_bytes()).unwrap(),
                &format!("{}{}", gw.admin_url(), fill(template)),
                &[],
                b"",
            )
            .await;
            assert!(
                ![StatusCode::NOT_FOUND, StatusCode::METHOD_NOT_ALLOWED].contains(&r.status),
                "{m} {template}: {}",
                r.status
            );
        }
    }
    let r = request(
        Method::PATCH,
        &format!("{}/metrics", gw.admin_url()),
        &[],
        b"",
    )
    .await;
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
}
