//! The IMDS surface that intercepted callers see.
//!
//! For now it is deliberately closed: every path answers 404, so a caller
//! gets no credentials and nothing of the real IMDS. Serving each container
//! its own role's credentials builds on the [`Caller`] handed in here.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};

use crate::server::Caller;

pub async fn handle(_req: Request<Incoming>, _caller: Arc<Caller>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(b"Not Found\n")));
    *resp.status_mut() = StatusCode::NOT_FOUND;
    resp
}
