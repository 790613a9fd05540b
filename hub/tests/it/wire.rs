//! The device side's WebSocket framing, seen from real clients: what a
//! library client may send besides one text frame per message, and what
//! no client may send.

use futures_util::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{CloseCode, Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::MaybeTlsStream;

use crate::harness::*;

/// `text` in fragments of `n` bytes, as raw frames.
fn fragments(text: &str, n: usize) -> Vec<Message> {
    let chunks: Vec<&[u8]> = text.as_bytes().chunks(n).collect();
    let last = chunks.len() - 1;
    chunks
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let op = if i == 0 { Data::Text } else { Data::Continue };
            Message::Frame(Frame::message(c.to_vec(), OpCode::Data(op), i == last))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fragmented_reading_with_a_ping_between_its_fragments_is_stored_and_the_ping_answered() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    let mut frames = fragments(&reading(2, 0), 40);
    assert!(frames.len() > 3);
    frames.insert(2, Message::Ping(b"between".to_vec().into()));
    for f in frames {
        ws.feed(f).await.unwrap();
    }
    ws.flush().await.unwrap();
    // The pong comes first: the ping arrived before the message was whole.
    let pong = tokio::time::timeout(SOON, ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"between".to_vec().into()));
    wait_ack(&mut ws, 2, 0).await;
    assert_eq!(hub.stored("dev"), vec![(2, 0)]);
    // Readings in one frame still follow.
    send_text(&mut ws, reading(2, 1)).await;
    wait_ack(&mut ws, 2, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_readings_in_one_write_are_each_stored() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    // 200 readings (~45 KB) queued and written together: they reach the
    // hub in reads that end mid-frame.
    for seq in 0..200 {
        ws.feed(Message::Text(reading(4, seq).into()))
            .await
            .unwrap();
    }
    ws.flush().await.unwrap();
    wait_ack(&mut ws, 4, 199).await;
    assert_eq!(hub.stored("dev").len(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_over_the_size_limit_close_with_1009() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    let big = format!(r#"{{"type":"reading","pad":"{}"}}"#, "x".repeat(17 * 1024));
    for f in fragments(&big, 4096) {
        // The hub may close before the last fragment is sent.
        if ws.send(f).await.is_err() {
            break;
        }
    }
    expect_close(&mut ws, 1009).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unmasked_frame_closes_with_1002() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(3, 0)).await;
    wait_ack(&mut ws, 3, 0).await;
    // A text frame "hi" without a mask, written under the client library.
    let MaybeTlsStream::Plain(tcp) = ws.get_mut() else {
        panic!("the test hub speaks plain TCP");
    };
    tcp.write_all(&[0x81, 0x02, b'h', b'i']).await.unwrap();
    assert_eq!(expect_close(&mut ws, 1002).await, "protocol error");
    assert_eq!(hub.stored("dev"), vec![(3, 0)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_from_the_device_is_echoed() {
    let hub = TestHub::start().await;
    let token = hub.add_device("dev");
    let mut ws = hub.device("dev", &token).await;
    send_text(&mut ws, reading(5, 0)).await;
    wait_ack(&mut ws, 5, 0).await;
    ws.close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
    .await
    .unwrap();
    // The client library reports the hub's echo as a close frame, then
    // the end of the stream.
    let echo = tokio::time::timeout(SOON, ws.next()).await.unwrap();
    match echo {
        Some(Ok(Message::Close(Some(f)))) => assert_eq!(f.code, CloseCode::Normal),
        other => panic!("expected the close echoed, got {other:?}"),
    }
}
