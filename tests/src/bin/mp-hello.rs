//! The benchmark's baseline: a minimal HTTP server (hyper on a
//! single-threaded tokio runtime, as metaproxy runs by default) that
//! answers every request with 200 and a body of BODY_BYTES bytes (default
//! 19). `mp-hello ADDR [BODY_BYTES]`
use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

#[tokio::main(flavor = "current_thread")]
async fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr = args.next().unwrap_or_else(|| "127.0.0.1:8080".into());
    let size = args.next().and_then(|n| n.parse().ok()).unwrap_or(19);
    let body = Bytes::from(vec![b'x'; size]);
    let listener = tokio::net::TcpListener::bind(&addr).await?;
    loop {
        let (stream, _) = listener.accept().await?;
        let body = body.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let body = body.clone();
                    async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
