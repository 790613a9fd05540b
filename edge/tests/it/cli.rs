//! The command line: `ems-edge check`, and start-up errors as one line with
//! a non-zero exit.

use std::fs;
use std::io::Write as _;
use std::path::Path;
use std::process::Command;

use crate::harness::*;

#[test]
fn check_reports_the_handshake_outcome() {
    let w = World::new();
    let _hub = w.hub();
    let config = w.config("edge.toml", "", "");
    let check = |token: &str| {
        Command::new(env!("CARGO_BIN_EXE_ems-edge"))
            .args(["check", "--config"])
            .arg(&config)
            .env("EMS_DEVICE_TOKEN", token)
            .output()
            .unwrap()
    };
    let ok = check(&w.token);
    let out = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success(), "{out}");
    assert!(out.contains("accepted (101)"), "{out}");
    assert!(!out.contains(&w.token));
    let bad = check("emsd_wrong");
    let out = String::from_utf8_lossy(&bad.stdout);
    assert!(!bad.status.success());
    assert!(out.contains("403"), "{out}");
}

#[test]
fn startup_errors_are_one_line_and_non_zero() {
    let w = World::new();
    let run = |config: &Path, token: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ems-edge"));
        cmd.args(["run", "--config"]).arg(config);
        cmd.env_remove("EMS_DEVICE_TOKEN")
            .env_remove("CREDENTIALS_DIRECTORY");
        if let Some(t) = token {
            cmd.env("EMS_DEVICE_TOKEN", t);
        }
        cmd.output().unwrap()
    };
    // Unknown key: named, with its line.
    let config = w.config("typo.toml", "sample_intervall_ms = 5", "");
    let out = run(&config, Some(&w.token));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("sample_intervall_ms") && err.contains("line 8"),
        "{err}"
    );
    // Missing token.
    let config = w.config("edge.toml", "", "");
    let out = run(&config, None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("EMS_DEVICE_TOKEN"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    // An unusable spool directory.
    let text = fs::read_to_string(&config).unwrap();
    let bad = w.dir.path().join("bad.toml");
    let spool_line = format!("spool_dir = \"{}\"", w.spool_dir().display());
    fs::write(
        &bad,
        text.replace(&spool_line, "spool_dir = \"/proc/ems-no-such-dir\""),
    )
    .unwrap();
    let out = run(&bad, Some(&w.token));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("spool /proc/ems-no-such-dir"), "{err}");
    assert!(!err.contains(&w.token));
    // Token from the credentials directory works (systemd LoadCredential).
    let creds = w.dir.path().join("creds");
    fs::create_dir_all(&creds).unwrap();
    let mut f = fs::File::create(creds.join("ems-device-token")).unwrap();
    writeln!(f, "{}", w.token).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ems-edge"))
        .args(["check", "--config"])
        .arg(&config)
        .env_remove("EMS_DEVICE_TOKEN")
        .env("CREDENTIALS_DIRECTORY", &creds)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("device token present"), "{text}");
}
