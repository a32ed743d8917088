//! Tests of the harness itself, so a broken test double cannot make the real
//! tests pass: the fault switch must produce exactly the failure each fault
//! names (seen through the real `PlatformClient`), and the git server must
//! accept only current tokens.

use std::collections::HashMap;
use std::ffi::OsString;
use std::time::Duration;

use credd_core::config::PlatformConfig;
use credd_core::platform_api::TokenQuery;
use molecule_credd::platform::{ErrorClass, PlatformClient, PlatformError, Timeouts};

use testkit::{
    Fault, GitServer, Sandbox, TestPlatform, WAIT, assert_secret, with_platform, write_file,
};

fn client(sandbox: &Sandbox, url: &str) -> PlatformClient {
    let env: HashMap<&str, OsString> = HashMap::from([
        ("PLATFORM_URL", url.into()),
        ("CONFIGS_DIR", sandbox.configs_dir().into()),
    ]);
    let config = PlatformConfig::from_lookup(|k| env.get(k).cloned()).expect("config");
    PlatformClient::new(
        &config,
        Timeouts {
            connect: Duration::from_secs(2),
            total: Duration::from_secs(2),
        },
    )
    .expect("client")
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn fault_switch_produces_each_failure() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    let client = client(&sandbox, &platform.url());
    let rt = runtime();

    let grant = rt
        .block_on(client.fetch(&TokenQuery::default()))
        .expect("pass-through serves a token");
    platform.assert_last_issued(grant.token.expose(), "issued");
    assert!(grant.lifetime > Duration::from_secs(60));

    platform.set_fault(Fault::Status(500));
    let err = rt
        .block_on(client.fetch(&TokenQuery::default()))
        .expect_err("500");
    assert!(
        matches!(err, PlatformError::Server { status: 500, .. }),
        "{err:?}"
    );
    platform.set_fault(Fault::Status(401));
    assert_eq!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err()
            .class(),
        ErrorClass::Unauthorized
    );
    platform.set_fault(Fault::Status(404));
    assert_eq!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err()
            .class(),
        ErrorClass::NotConfigured
    );
    platform.set_fault(Fault::RateLimited {
        retry_after_secs: 7,
    });
    let err = rt
        .block_on(client.fetch(&TokenQuery::default()))
        .unwrap_err();
    assert_eq!(err.retry_after(), Some(Duration::from_secs(7)), "{err:?}");
    platform.set_fault(Fault::NotJson);
    assert!(matches!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err(),
        PlatformError::Malformed { .. }
    ));
    platform.set_fault(Fault::Hang);
    assert!(matches!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err(),
        PlatformError::Timeout { .. }
    ));
    platform.set_fault(Fault::Down);
    assert!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err()
            .is_unreachable()
    );
    let before = platform.requests();
    platform.set_fault(Fault::ShortLife(Duration::from_secs(30)));
    let grant = rt
        .block_on(client.fetch(&TokenQuery::default()))
        .expect("back up on the same port");
    assert!(
        grant.lifetime <= Duration::from_secs(31),
        "{:?}",
        grant.lifetime
    );
    assert_eq!(platform.requests(), before + 1, "down sees no requests");
    assert_eq!(platform.wait_for_requests(before + 1, WAIT), before + 1);
    let faults: Vec<_> = platform.seen().into_iter().map(|r| r.fault).collect();
    assert_eq!(faults[0], Fault::PassThrough);
    assert_eq!(faults[1], Fault::Status(500));
    assert!(
        !faults.contains(&Fault::Down),
        "a down platform sees nothing"
    );

    // A platform clock two hours behind: the stated expiry is in our past,
    // but measured against the platform's Date the token has its full life.
    platform.set_fault(Fault::ClockSkew(7200));
    let grant = rt
        .block_on(client.fetch(&TokenQuery::default()))
        .expect("skewed but valid");
    assert!(grant.expires_at < std::time::SystemTime::now());
    assert!(
        grant.lifetime > Duration::from_secs(3000),
        "{:?}",
        grant.lifetime
    );

    // A wrong bearer is refused by the platform service itself.
    write_file(
        &sandbox.configs_dir().join(".auth_token"),
        "wrong-bearer-0123456789",
        0o600,
    );
    platform.set_fault(Fault::PassThrough);
    assert_eq!(
        rt.block_on(client.fetch(&TokenQuery::default()))
            .unwrap_err()
            .class(),
        ErrorClass::Unauthorized
    );
}

#[test]
fn git_server_accepts_only_current_tokens() {
    let (sandbox, platform) = with_platform(TestPlatform::start());
    let server = GitServer::start(&sandbox.path().join("repos"), platform.authority());
    let url = server.create_repo("solo");
    let rt = runtime();
    let token = rt
        .block_on(client(&sandbox, &platform.url()).fetch(&TokenQuery::default()))
        .expect("token");

    // A shell helper answering with a fixed password: first a wrong one.
    let helper = sandbox.path().join("fixed-helper.sh");
    let write_helper = |password: &str| {
        write_file(
            &helper,
            format!(
                "#!/bin/sh\ntest \"$1\" = get && printf 'username=x-access-token\\npassword={password}\\n'\nexit 0\n"
            ),
            0o755,
        );
    };
    sandbox.configure_git_helpers(&server.base_url(), &[helper.to_str().expect("utf-8 path")]);
    write_helper("ghs_not_a_token_the_platform_issued");
    let work = sandbox.path().join("work");
    let refused = sandbox.git(&work, &["clone", &url, "a"]).run();
    assert!(
        !refused.status.success(),
        "clone with a wrong token must fail"
    );
    assert!(server.rejected_credentials() >= 1);
    assert!(
        server.unauthorized() > server.rejected_credentials(),
        "git tries anonymously first"
    );

    write_helper(token.token.expose());
    sandbox
        .git(&work, &["clone", &url, "b"])
        .run()
        .assert_success("clone with the issued token");
    assert_eq!(server.accepted_tokens().len(), 1);
    assert_secret(
        server.accepted_tokens().first().map(String::as_str),
        token.token.expose(),
        true,
        "accepted",
    );
}
