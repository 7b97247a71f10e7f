use super::limits::admits;
use super::*;

#[test]
fn a_share_is_capped_and_the_reserve_keeps_room_for_new_jobs() {
    let limits = Limits {
        max_connections: 4096,
        max_connections_per_cgroup: 256,
    };
    // Within its share, while the pool has room.
    assert!(admits(limits, 100, 255));
    assert!(!admits(limits, 100, 256));
    // 16 greedy jobs have taken the pool down to its reserve (512):
    // they get no more, but a new job, or a job holding a few, does.
    assert!(!admits(limits, 3585, 200));
    assert!(admits(limits, 3585, 0));
    assert!(admits(limits, 4096, 7));
    assert!(!admits(limits, 4096, 8));
}

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

async fn pair() -> (HandBack, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let client = TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    let (server, _) = listener.accept().await.unwrap();
    (HandBack::new(server), client)
}

/// What a read on the server side does now: `Some(n)` bytes (0 is
/// end-of-stream), `None` if it waits.
async fn read_now(io: &mut HandBack) -> Option<usize> {
    let mut buf = [0u8; 256];
    tokio::time::timeout(Duration::from_millis(100), io.read(&mut buf))
        .await
        .ok()
        .map(Result::unwrap)
}

async fn answer(io: &mut HandBack) {
    io.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    io.flush().await.unwrap();
}

#[tokio::test]
async fn hands_back_only_once_everything_read_is_answered() {
    let (mut io, mut client) = pair().await;
    // Nothing read or answered yet: a read waits.
    assert_eq!(read_now(&mut io).await, None);
    // A whole head, answered: the next read is handed back.
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_now(&mut io).await, Some(18));
    let answering = InFlight::enter(&io.in_flight);
    // Still in the service: a read waits, even after a flush (an
    // interim answer).
    answer(&mut io).await;
    assert_eq!(read_now(&mut io).await, None);
    drop(answering);
    answer(&mut io).await;
    assert_eq!(read_now(&mut io).await, Some(0));
    assert!(io.handed_back);
}

#[tokio::test]
async fn a_head_in_pieces_or_a_body_to_come_is_waited_for() {
    let (mut io, mut client) = pair().await;
    client.write_all(b"GET / HTTP/1.1\r\n\r\n").await.unwrap();
    assert_eq!(read_now(&mut io).await, Some(18));
    answer(&mut io).await;
    // The next request's first bytes arrive; the rest has not.
    client.write_all(b"GET / HT").await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(read_now(&mut io).await, Some(8));
    answer(&mut io).await;
    assert_eq!(read_now(&mut io).await, None);
    // A head whose body is still to come.
    client
        .write_all(b"TP/1.1\r\n\r\nPUT / HTTP/1.1\r\ncontent-length: 2\r\n\r\nx")
        .await
        .unwrap();
    assert!(read_now(&mut io).await.unwrap() > 0);
    answer(&mut io).await;
    assert_eq!(read_now(&mut io).await, None);
    assert!(!io.handed_back);
    // A client that closes is end-of-stream of its own.
    client.shutdown().await.unwrap();
    assert_eq!(read_now(&mut io).await, Some(0));
    assert!(io.waiting_again().is_err());
}
