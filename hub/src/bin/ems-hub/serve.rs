//! `ems-hub serve`: the process around the library's [`ems_hub::run`] —
//! the allocator's tuning (`heap`), the async runtime, the listening
//! socket and the signals that start a graceful shutdown.

use std::net::SocketAddr;

use anyhow::Context;

use crate::cli::Serve;

/// Runs the hub until SIGTERM or SIGINT, then shuts it down gracefully.
pub fn run(serve: Serve) -> anyhow::Result<()> {
    let Serve {
        listen: addr,
        config,
        workers,
    } = serve;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    let arenas = crate::heap::Arenas::limit();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder
        .worker_threads(workers)
        .enable_all()
        // Blocking work is store look-ups, serialized on one store handle:
        // more threads only wait on its lock. Tokio's default (512) let a
        // storm of 10,000 handshakes start ~250 threads, each with its own
        // stack and malloc arena (docs/decisions/hub-process-tuning.md).
        .max_blocking_threads(8);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    builder.on_thread_start(arenas.on_thread_start());
    let rt = builder.build().context("cannot start the async runtime")?;
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    arenas.wait_for_workers(workers);
    log::info!("ems-hub: {workers} async worker thread(s)");
    rt.block_on(async move {
        let listener = listen(addr).with_context(|| {
            format!("cannot listen on {addr} (in use? choose another with --listen)")
        })?;
        let hub = ems_hub::run(listener, config, shutdown_signal());
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        let hub = async {
            tokio::select! {
                r = hub => r,
                never = crate::heap::trim_after_bursts() => match never {},
            }
        };
        hub.await?;
        Ok(())
    })
}

/// Binds the listening socket with a deep accept queue. `TcpListener::bind`
/// asks for 128 pending connections; when every device reconnects at once
/// (a hub restart, 10,000 devices) the overflow is dropped and those clients
/// retry their SYN only after a second. The kernel caps the value at
/// `net.core.somaxconn` (docs/decisions/hub-process-tuning.md).
fn listen(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(4096)
}

/// Completes on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            log::error!("cannot listen for SIGTERM: {e}");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => log::info!("SIGTERM received"),
        _ = tokio::signal::ctrl_c() => log::info!("SIGINT received"),
    }
}
