//! The CLI's side of the admin socket (see [`crate::ops::admin`]): GET a path
//! and stream the body.

use std::{io, path::Path};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

use crate::ops::connlog::Connection;

/// GET `path` on the admin socket and hand each
/// chunk of the body to `on_chunk` as it arrives.
pub async fn get(
    socket: &Path,
    path: &str,
    mut on_chunk: impl FnMut(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let stream = UnixStream::connect(socket).await.map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => anyhow::anyhow!(
            "metaproxy is not running: nothing answers on {} (start it with `metaproxy run`, or pass --admin-socket)",
            socket.display()
        ),
        io::ErrorKind::PermissionDenied => {
            anyhow::anyhow!("permission denied on {}: the admin socket is for root", socket.display())
        }
        _ => anyhow::Error::new(e).context(format!("connecting to {}", socket.display())),
    })?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("admin socket handshake")?;
    tokio::spawn(conn);
    let req = Request::get(path)
        .header(hyper::header::HOST, "metaproxy")
        .body(http_body_util::Empty::<Bytes>::new())?;
    let mut resp = sender.send_request(req).await.context("admin request")?;
    if !resp.status().is_success() {
        anyhow::bail!("admin socket answered {}", resp.status());
    }
    while let Some(frame) = resp.body_mut().frame().await {
        if let Ok(data) = frame.context("reading admin response")?.into_data() {
            on_chunk(&data)?;
        }
    }
    Ok(())
}

/// Parses the NDJSON / JSON array the connections endpoint returns.
/// The daemon's status, as its type says it is.
pub async fn status(socket: &Path) -> anyhow::Result<crate::ops::admin::Status> {
    let mut body = Vec::new();
    get(socket, "/v1/status", |chunk| {
        body.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("the daemon's status: {e}"))
}

/// A dry AssumeRole of `arn` by the daemon, with its own credentials.
pub async fn try_role(
    socket: &Path,
    arn: &str,
    external_id: Option<&str>,
) -> anyhow::Result<crate::ops::admin::Trial> {
    let mut body = Vec::new();
    let mut path = format!("/v1/try-role?arn={arn}");
    if let Some(id) = external_id {
        path.push_str(&format!("&external_id={id}"));
    }
    get(socket, &path, |chunk| {
        body.extend_from_slice(chunk);
        Ok(())
    })
    .await?;
    serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("the daemon's trial: {e}"))
}

pub fn parse_connections(body: &[u8]) -> anyhow::Result<Vec<Connection>> {
    Ok(serde_json::from_slice(body)?)
}
