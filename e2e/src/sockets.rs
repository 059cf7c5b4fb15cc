//! TCP sockets inside a network namespace, used from the test's own thread: a socket
//! stays in the namespace it was created in, so a short-lived thread enters the
//! namespace, creates the socket and hands it back.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::{Context, Result};

/// Runs `f` (which makes a socket) inside `netns`; the socket stays there.
pub fn in_netns<T: Send + 'static>(
    netns: &str,
    f: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T> {
    let path = format!("/run/netns/{netns}");
    std::thread::spawn(move || -> Result<T> {
        // This thread exists only to make the socket; it never leaves the namespace.
        netns_rs::get_from_path(&path)?.enter()?;
        Ok(f()?)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("socket thread panicked"))?
    .with_context(|| format!("socket in {netns}"))
}

pub fn listen_in(netns: &str, addr: SocketAddr) -> Result<TcpListener> {
    in_netns(netns, move || TcpListener::bind(addr))
}

pub fn connect_from(netns: &str, addr: SocketAddr) -> Result<TcpStream> {
    let stream = in_netns(netns, move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(5))
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    Ok(stream)
}

/// Connects from `client_ns` to a listener in `server_ns` and returns the source
/// address the server saw and the number of bytes it received of `payload`.
pub fn transfer(
    client_ns: &str,
    server_ns: &str,
    server: SocketAddr,
    payload: usize,
) -> Result<(SocketAddr, usize)> {
    use std::io::{Read, Write};
    let bind = SocketAddr::new(server.ip(), server.port());
    let listener = listen_in(server_ns, bind)?;
    let receiver = std::thread::spawn(move || -> Result<(SocketAddr, usize)> {
        let (mut conn, peer) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut total = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = match conn.read(&mut buf) {
                // A signal to this process (a child exiting) is no end of the stream.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                other => other?,
            };
            if n == 0 {
                return Ok((peer, total));
            }
            total += n;
        }
    });
    let mut stream = connect_from(client_ns, server)?;
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0;
    while sent < payload {
        let n = chunk.len().min(payload - sent);
        stream.write_all(&chunk[..n])?;
        sent += n;
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    receiver
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?
}

/// GET `path` from `to` inside `netns` (HTTP/1.0): the status and the whole response;
/// None when nothing answers.
pub fn http_get(netns: &str, to: SocketAddr, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = connect_from(netns, to).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, response))
}
