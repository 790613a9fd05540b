//! Admin tokens can be listed, rotated and revoked (`ems-hub admin list |
//! revoke | rotate`, `POST /api/admin/admins/{name}/revoke`); the last
//! active admin cannot be revoked; a revoked admin token is refused by
//! every endpoint within 2 s, also by another hub process on the same
//! database.

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::dashboard::{bearer, http};
use crate::harness::*;
use crate::probe::free_port;

/// `ems-hub serve` as a process of its own on `db`; killed when dropped.
struct ServeProcess {
    child: Child,
    addr: std::net::SocketAddr,
}

impl ServeProcess {
    fn start(db: &str) -> ServeProcess {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_ems-hub"))
            .args([
                "serve",
                "--listen",
                &addr.to_string(),
                "--log-level",
                "warn",
            ])
            .env("EMS_DATABASE_URL", db)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + SOON;
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(Instant::now() < deadline, "the second hub did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
        ServeProcess { child, addr }
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn hub_cli(args: &[&str], db: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(args)
        .env("EMS_DATABASE_URL", db)
        .env_remove("EMS_LOG_LEVEL")
        .output()
        .unwrap()
}

fn out(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn err(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

async fn status(addr: std::net::SocketAddr, method: &str, path: &str, token: &str) -> u16 {
    let body = (method == "POST").then_some("{}");
    http(
        addr,
        method,
        path,
        &[("Authorization", &bearer(token))],
        body,
    )
    .await
    .status
}

#[test]
fn admin_list_rotate_and_revoke_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("hub.db").display());
    let ops = out(&hub_cli(&["admin", "add", "ops"], &db))
        .trim()
        .to_string();
    assert!(ops.starts_with("emsa_"), "{ops}");
    let night = out(&hub_cli(&["admin", "add", "night"], &db))
        .trim()
        .to_string();

    let list = hub_cli(&["admin", "list"], &db);
    assert!(list.status.success(), "{}", err(&list));
    assert_eq!(out(&list), "night\tactive\nops\tactive\n");
    assert!(!out(&list).contains("emsa_"));

    let rot = hub_cli(&["admin", "rotate", "ops"], &db);
    assert!(rot.status.success(), "{}", err(&rot));
    let ops2 = out(&rot).trim().to_string();
    assert!(ops2.starts_with("emsa_") && ops2 != ops, "{ops2}");
    let mut store = ems_hub::store::open(&db).unwrap();
    let hash = |t: &str| ems_hub::auth::token::hash(t);
    assert_eq!(store.admin_name(&hash(&ops)).unwrap(), None);
    assert_eq!(
        store.admin_name(&hash(&ops2)).unwrap().as_deref(),
        Some("ops")
    );

    let rev = hub_cli(&["admin", "revoke", "night"], &db);
    assert!(rev.status.success(), "{}", err(&rev));
    assert_eq!(store.admin_name(&hash(&night)).unwrap(), None);
    assert_eq!(
        out(&hub_cli(&["admin", "list"], &db)),
        "night\trevoked\nops\tactive\n"
    );
    // The last active admin stays.
    let last = hub_cli(&["admin", "revoke", "ops"], &db);
    assert!(!last.status.success());
    assert!(err(&last).contains("last active admin"), "{}", err(&last));
    assert_eq!(
        store.admin_name(&hash(&ops2)).unwrap().as_deref(),
        Some("ops")
    );
    let missing = hub_cli(&["admin", "revoke", "nobody"], &db);
    assert!(!missing.status.success());
    assert!(err(&missing).contains("not found"), "{}", err(&missing));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_admin_token_is_refused_everywhere_within_two_seconds() {
    let hub = TestHub::start().await;
    let ops = hub.admin().add_admin("ops").unwrap();
    let night = hub.admin().add_admin("night").unwrap();
    hub.add_device("dev-a");
    // A second hub, a process of its own, on the same database.
    let other = tokio::task::block_in_place(|| ServeProcess::start(&hub.db_url));
    let endpoints = [
        ("GET", "/api/admin/devices"),
        ("GET", "/api/admin/viewers"),
        ("GET", "/api/admin/admins"),
    ];
    for addr in [hub.addr, other.addr] {
        for (m, p) in endpoints {
            assert_eq!(status(addr, m, p, &night).await, 200, "{m} {p}");
        }
    }
    // ops revokes night through the API of the first hub.
    let r = http(
        hub.addr,
        "POST",
        "/api/admin/admins/night/revoke",
        &[("Authorization", &bearer(&ops))],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let t = Instant::now();
    for addr in [hub.addr, other.addr] {
        loop {
            let s = status(addr, "GET", "/api/admin/devices", &night).await;
            if s == 403 {
                break;
            }
            assert!(t.elapsed() < SOON, "still {s} after {:?}", t.elapsed());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let took = t.elapsed();
    println!("revoked admin token refused by both hubs after {took:?}");
    assert!(
        took < Duration::from_secs(2) + Duration::from_millis(500),
        "{took:?}"
    );
    for addr in [hub.addr, other.addr] {
        for (m, p) in endpoints {
            assert_eq!(status(addr, m, p, &night).await, 403, "{m} {p}");
        }
        let post = status(addr, "POST", "/api/admin/admins/ops/revoke", &night).await;
        assert_eq!(post, 403);
    }
    // The last active admin cannot be revoked (409), not even by itself.
    let r = http(
        other.addr,
        "POST",
        "/api/admin/admins/ops/revoke",
        &[("Authorization", &bearer(&ops))],
        Some("{}"),
    )
    .await;
    assert_eq!(r.status, 409, "{}", r.body);
    let list = http(
        hub.addr,
        "GET",
        "/api/admin/admins",
        &[("Authorization", &bearer(&ops))],
        None,
    )
    .await;
    assert_eq!(list.status, 200);
    let v = list.json();
    let admins = v["admins"].as_array().unwrap();
    assert_eq!(admins.len(), 2, "{v}");
    assert!(!list.body.contains("emsa_"));
    drop(other);
}
