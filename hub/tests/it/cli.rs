//! The `ems-hub` command line, run as a real process.

use std::process::{Command, Output};

fn hub(args: &[&str], db: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(args)
        .env("EMS_DATABASE_URL", db)
        .env_remove("EMS_LOG_LEVEL")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn device_and_viewer_admin_commands() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite:{}", dir.path().join("hub.db").display());

    let add = hub(&["device", "add", "ems_001"], &db);
    assert!(add.status.success(), "{}", stderr(&add));
    let out = stdout(&add);
    assert_eq!(
        out.lines().count(),
        1,
        "token must be the only stdout line: {out:?}"
    );
    let token = out.trim();
    assert!(token.starts_with("emsd_"), "{token}");
    assert!(token.len() >= 48);
    assert!(token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-'));
    assert!(!stderr(&add).contains(token));

    let dup = hub(&["device", "add", "ems_001"], &db);
    assert!(!dup.status.success());
    assert!(stdout(&dup).is_empty());
    assert!(stderr(&dup).contains("exists"), "{}", stderr(&dup));

    let bad = hub(&["device", "add", "no/slash"], &db);
    assert!(!bad.status.success());

    // --database flag beats the environment.
    let other = format!("sqlite:{}", dir.path().join("other.db").display());
    let add2 = Command::new(env!("CARGO_BIN_EXE_ems-hub"))
        .args(["device", "add", "ems_002", "--database", &other])
        .env("EMS_DATABASE_URL", &db)
        .output()
        .unwrap();
    assert!(add2.status.success(), "{}", stderr(&add2));

    let rot = hub(&["device", "rotate", "ems_001"], &db);
    assert!(rot.status.success());
    let new_token = stdout(&rot).trim().to_string();
    assert_ne!(new_token, token);

    let rev = hub(&["device", "revoke", "ems_001"], &db);
    assert!(rev.status.success(), "{}", stderr(&rev));
    let list = stdout(&hub(&["device", "list"], &db));
    assert!(
        list.contains("ems_001") && list.contains("revoked"),
        "{list}"
    );
    assert!(!list.contains("ems_002"));

    let missing = hub(&["device", "revoke", "nope"], &db);
    assert!(!missing.status.success());

    let viewer = hub(&["viewer", "add", "kitchen", "--device", "ems_001"], &db);
    assert!(viewer.status.success(), "{}", stderr(&viewer));
    assert!(stdout(&viewer).trim().starts_with("emsv_"));
    let all = hub(&["viewer", "add", "ops", "--all-devices"], &db);
    assert!(all.status.success(), "{}", stderr(&all));
    let neither = hub(&["viewer", "add", "x"], &db);
    assert!(!neither.status.success());
}

#[test]
fn bad_configuration_is_a_one_line_error() {
    let dir = tempfile::tempdir().unwrap();
    // A directory is not a database.
    let db = format!("sqlite:{}", dir.path().display());
    let o = hub(&["device", "list"], &db);
    assert!(!o.status.success());
    assert_eq!(stderr(&o).trim().lines().count(), 1, "{}", stderr(&o));

    let o = hub(&["serve", "--listen", "not-an-address"], "sqlite::memory:");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("--listen"), "{}", stderr(&o));

    let o = hub(&["device", "list"], "mysql://x");
    assert!(!o.status.success());
    assert!(stderr(&o).contains("sqlite:"), "{}", stderr(&o));
}
