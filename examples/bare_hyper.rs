//! The performance ceiling for `benches/load.sh`: a bare hyper server answering from memory
//! with the same bytes the gateway serves, and no routing, cache, metrics or logging.
//!
//! Usage: bare_hyper ADDR BIG_FILE SMALL_FILE BIG_GZ_FILE
//! Serves /big, /small, and /big with `Accept-Encoding: gzip` from the gzip file.

use bytes::Bytes;
use http::{header, HeaderValue, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() == 5,
        "usage: bare_hyper ADDR BIG_FILE SMALL_FILE BIG_GZ_FILE"
    );
    let big = Bytes::from(std::fs::read(&args[2])?);
    let small = Bytes::from(std::fs::read(&args[3])?);
    let big_gz = Bytes::from(std::fs::read(&args[4])?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args[1]).await?;
        println!("bare hyper listening on {}", listener.local_addr()?);
        loop {
            let (stream, _) = listener.accept().await?;
            let _ = stream.set_nodelay(true);
            let (big, small, big_gz) = (big.clone(), small.clone(), big_gz.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let gz = req
                        .headers()
                        .get(header::ACCEPT_ENCODING)
                        .is_some_and(|v| v.as_bytes().windows(4).any(|w| w == b"gzip"));
                    let body = match (req.uri().path(), gz) {
                        ("/small", _) => small.clone(),
                        (_, true) => big_gz.clone(),
                        _ => big.clone(),
                    };
                    let mut r = Response::new(Full::new(body));
                    r.headers_mut().insert(
                        header::CONTENT_TYPE,
                        HeaderValue::from_static("application/json"),
                    );
                    if gz && req.uri().path() != "/small" {
                        r.headers_mut()
                            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                    }
                    async move { Ok::<_, Infallible>(r) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    })
}
