//! A TCP relay in front of a server whose door can be shut: connections made while it is open
//! keep working, new ones are refused (accepted and closed at once) while it is shut. For
//! tests of a client that must replace its connection while the server cannot be reached
//! anew, without touching the connections of anyone else.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A relay on `127.0.0.1:<port>` to `127.0.0.1:<upstream>`; stops on drop.
#[derive(Debug)]
pub struct Relay {
    port: u16,
    open: Arc<AtomicBool>,
    stop: CancellationToken,
}

impl Relay {
    /// Starts relaying to `upstream`, open.
    pub async fn start(upstream: u16) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
        let port = listener.local_addr()?.port();
        let open = Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let (door, stopped) = (open.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    () = stopped.cancelled() => return,
                };
                let Ok((mut inbound, _)) = accepted else {
                    continue;
                };
                if !door.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let stopped = stopped.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        () = stopped.cancelled() => {}
                    }
                });
            }
        });
        Ok(Self { port, open, stop })
    }

    /// The port clients connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Opens (`true`) or shuts (`false`) the door for new connections.
    pub fn set_open(&self, open: bool) {
        self.open.store(open, Ordering::SeqCst);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
