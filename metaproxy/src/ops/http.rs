//! What the daemon's own HTTP endpoints (metrics, admin socket) answer
//! with when the answer is a line of text.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{header, Response, StatusCode};

/// A `text/plain` answer.
pub fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}
