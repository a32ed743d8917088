//! Who is on the other end of a loopback TCP connection.
//!
//! Why: TCP has no `SO_PEERCRED`. The kernel still says which uid owns each
//! socket, in `/proc/net/tcp` (`/proc/net/tcp6`), readable by everyone: the
//! caller's socket is the line whose local address is the connection's peer
//! address and whose remote address is ours. That is one read of a small
//! procfs file per connection (not per request). The uid admits or refuses
//! the caller (the daemon's own and `--allow-uid`s, as on the socket) and
//! goes into the audit line.
//!
//! The caller's pid is not looked up: mapping the socket's inode to a pid
//! means reading every process's `/proc/PID/fd`, which the kernel shows only
//! to the same uid or root — and in sealed mode the daemon is neither the
//! agent's uid nor root. So audit lines carry the uid only.

use std::net::{IpAddr, SocketAddr};

/// The uid owning the socket at `peer` connected to `local`, if the kernel
/// lists it.
pub(crate) fn uid_of(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let (file, want_local, want_remote) = match (peer.ip(), local.ip()) {
        (IpAddr::V4(p), IpAddr::V4(l)) => (
            "/proc/net/tcp",
            v4(p.octets(), peer.port()),
            v4(l.octets(), local.port()),
        ),
        (IpAddr::V6(p), IpAddr::V6(l)) => (
            "/proc/net/tcp6",
            v6(p.octets(), peer.port()),
            v6(l.octets(), local.port()),
        ),
        _ => return None,
    };
    let table = std::fs::read_to_string(file).ok()?;
    find_uid(&table, &want_local, &want_remote)
}

/// The uid column of the line with these local and remote addresses.
fn find_uid(table: &str, local: &str, remote: &str) -> Option<u32> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let _slot = fields.next()?;
        let l = fields.next()?;
        let r = fields.next()?;
        if !(l.eq_ignore_ascii_case(local) && r.eq_ignore_ascii_case(remote)) {
            return None;
        }
        // st tx_queue:rx_queue tr:tm->when retrnsmt uid
        fields.nth(4)?.parse().ok()
    })
}

/// procfs's form of an IPv4 address: the address as a native-endian
/// 32-bit number in hex, then the port.
fn v4(octets: [u8; 4], port: u16) -> String {
    format!("{:08X}:{port:04X}", u32::from_ne_bytes(octets))
}

/// procfs's form of an IPv6 address: four native-endian 32-bit words.
fn v6(octets: [u8; 16], port: u16) -> String {
    let mut out = String::with_capacity(37);
    for word in octets.chunks(4) {
        let word = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
        out.push_str(&format!("{word:08X}"));
    }
    out.push_str(&format!(":{port:04X}"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_callers_uid_in_a_real_connection() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let local = listener.local_addr().expect("addr");
        let _client = std::net::TcpStream::connect(local).expect("connect");
        let (_server, peer) = listener.accept().expect("accept");
        assert_eq!(
            uid_of(peer, local),
            Some(nix::unistd::geteuid().as_raw()),
            "the kernel's table names our own uid for our own socket"
        );
        let other = SocketAddr::new(peer.ip(), 1);
        assert_eq!(uid_of(other, local), None);
    }

    #[test]
    fn parses_the_table_format() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   \
            0: 0100007F:9C40 0100007F:1F90 01 00000000:00000000 00:00000000 00000000  1000        0 12345 1 0 20 4 30 10 -1\n";
        assert_eq!(
            find_uid(
                table,
                &v4([127, 0, 0, 1], 0x9C40),
                &v4([127, 0, 0, 1], 0x1F90)
            ),
            if cfg!(target_endian = "little") {
                Some(1000)
            } else {
                None
            }
        );
    }
}
