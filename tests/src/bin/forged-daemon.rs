//! `forged-daemon`: a hostile stand-in for molecule-credd, for the tests.
//!
//! It plays the same-host attacker of the socket: it creates the socket's
//! folder with whatever mode it is told (say 0777, as a squatter in `/tmp`
//! would), binds the socket there, *then* drops to another uid before
//! `listen(2)` — `SO_PEERCRED` reports whoever called `listen`, so the
//! client sees a listener of that uid — and answers every connection with a
//! fixed protocol line (a forged token, or `unavailable` to suppress
//! fallbacks). For each connection it prints `request-bytes=N` on stdout, so
//! a test can tell whether the client sent it anything at all.
//!
//! usage: forged-daemon SOCKET FOLDER_MODE FOLDER_OWNER LISTEN_UID ANSWER_LINE
//! (modes in octal; it must start as root to chown and to drop uid).
#![forbid(unsafe_code)]

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use nix::sys::socket::{
    AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
};
use nix::unistd::{Gid, Uid, setresgid, setresuid};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [socket_path, folder_mode, folder_owner, listen_uid, answer] = args.as_slice() else {
        eprintln!("usage: forged-daemon SOCKET FOLDER_MODE FOLDER_OWNER LISTEN_UID ANSWER_LINE");
        std::process::exit(2);
    };
    let socket_path = PathBuf::from(socket_path);
    let folder = socket_path.parent().expect("a folder").to_owned();
    let mode = u32::from_str_radix(folder_mode, 8).expect("octal mode");
    let owner: u32 = folder_owner.parse().expect("numeric owner");
    let uid: u32 = listen_uid.parse().expect("numeric uid");

    std::fs::create_dir_all(&folder).expect("create the folder");
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(mode)).expect("chmod");
    nix::unistd::chown(
        &folder,
        Some(Uid::from_raw(owner)),
        Some(Gid::from_raw(owner)),
    )
    .expect("chown (run as root)");

    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    bind(
        fd.as_raw_fd(),
        &UnixAddr::new(&socket_path).expect("address"),
    )
    .expect("bind");
    std::fs::set_permissions(&socket_path, std::fs::Permissions::from_mode(0o777))
        .expect("chmod the socket");
    setresgid(Gid::from_raw(uid), Gid::from_raw(uid), Gid::from_raw(uid)).expect("setresgid");
    setresuid(Uid::from_raw(uid), Uid::from_raw(uid), Uid::from_raw(uid)).expect("setresuid");
    listen(&fd, Backlog::new(16).expect("backlog")).expect("listen");
    let listener = UnixListener::from(fd);
    println!("ready");
    let _ = std::io::stdout().flush();

    let line = format!("{answer}\n");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let received = read_request(&mut stream);
        println!("request-bytes={received}");
        let _ = std::io::stdout().flush();
        let _ = stream.write_all(line.as_bytes());
    }
}

/// Reads what the client sends within a short window.
fn read_request(stream: &mut UnixStream) -> usize {
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4096];
    let mut total = 0;
    while let Ok(n) = stream.read(&mut buf) {
        if n == 0 {
            break;
        }
        total += n;
        if buf[..n].contains(&b'\n') {
            break;
        }
    }
    total
}
