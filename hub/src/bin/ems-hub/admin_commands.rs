//! `ems-hub device …`, `viewer …` and `admin …`: runs each command against
//! the store and prints its result. A new token is the only line a command
//! prints on stdout, so scripts can capture it; lists are tab-separated.

use anyhow::Context;
use ems_hub::admin::Admin;
use ems_hub::store::{AdminInfo, DeviceInfo, ViewerInfo, ViewerScope};

use crate::cli::{AdminCmd, DeviceCmd, ViewerCmd};

/// Runs `ems-hub device …` against `db`.
pub fn device(db: &str, cmd: DeviceCmd) -> anyhow::Result<()> {
    let mut admin = Admin::open(db)?;
    match cmd {
        DeviceCmd::Add { id } => println!("{}", admin.add_device(&id)?),
        DeviceCmd::List => {
            for d in admin.list_devices()? {
                println!("{}", device_line(&d));
            }
        }
        DeviceCmd::Revoke { id } => admin.revoke_device(&id)?,
        DeviceCmd::Rotate { id } => println!("{}", admin.rotate_device(&id)?),
    }
    Ok(())
}

/// Runs `ems-hub viewer …` against `db`.
pub fn viewer(db: &str, cmd: ViewerCmd) -> anyhow::Result<()> {
    match cmd {
        ViewerCmd::Add {
            name,
            devices,
            all_devices,
        } => {
            let mut admin = Admin::open(db)?;
            let scope = if all_devices {
                ViewerScope::AllDevices
            } else {
                for d in &devices {
                    ems_shared::validate_device_id(d).with_context(|| format!("--device {d:?}"))?;
                }
                ViewerScope::Devices(devices)
            };
            println!("{}", admin.add_viewer(&name, scope)?);
        }
        ViewerCmd::List => {
            for v in Admin::open(db)?.list_viewers()? {
                println!("{}", viewer_line(&v));
            }
        }
        ViewerCmd::Revoke { name } => Admin::open(db)?.revoke_viewer(&name)?,
    }
    Ok(())
}

/// Runs `ems-hub admin …` against `db`.
pub fn admin(db: &str, cmd: AdminCmd) -> anyhow::Result<()> {
    let mut admin = Admin::open(db)?;
    match cmd {
        AdminCmd::Add { name } => println!("{}", admin.add_admin(&name)?),
        AdminCmd::List => {
            for a in admin.list_admins()? {
                println!("{}", admin_line(&a));
            }
        }
        AdminCmd::Revoke { name } => admin.revoke_admin(&name)?,
        AdminCmd::Rotate { name } => println!("{}", admin.rotate_admin(&name)?),
    }
    Ok(())
}

/// `admin list`: `NAME<TAB>active|revoked`. Never a token.
fn admin_line(a: &AdminInfo) -> String {
    let state = match a.revoked_ms {
        Some(_) => "revoked",
        None => "active",
    };
    format!("{}\t{state}", a.name)
}

/// `device list`: `ID<TAB>active|revoked`.
fn device_line(d: &DeviceInfo) -> String {
    let state = match d.revoked_ms {
        Some(_) => "revoked",
        None => "active",
    };
    format!("{}\t{state}", d.device_id)
}

/// `viewer list`: `NAME<TAB>active|revoked<TAB>*` or the device ids,
/// comma-separated. Never a token.
fn viewer_line(v: &ViewerInfo) -> String {
    let scope = match &v.scope {
        ViewerScope::AllDevices => "*".to_string(),
        ViewerScope::Devices(ids) => ids.join(","),
    };
    let state = if v.revoked_ms.is_some() {
        "revoked"
    } else {
        "active"
    };
    format!("{}\t{state}\t{scope}", v.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_lines_are_tab_separated() {
        let d = DeviceInfo {
            device_id: "ems_001".into(),
            created_ms: 1,
            revoked_ms: None,
        };
        assert_eq!(device_line(&d), "ems_001\tactive");
        let d = DeviceInfo {
            revoked_ms: Some(2),
            ..d
        };
        assert_eq!(device_line(&d), "ems_001\trevoked");
        let v = ViewerInfo {
            name: "wall".into(),
            scope: ViewerScope::Devices(vec!["a".into(), "b".into()]),
            created_ms: 1,
            revoked_ms: None,
        };
        assert_eq!(viewer_line(&v), "wall\tactive\ta,b");
        let v = ViewerInfo {
            scope: ViewerScope::AllDevices,
            revoked_ms: Some(3),
            ..v
        };
        assert_eq!(viewer_line(&v), "wall\trevoked\t*");
        let a = AdminInfo {
            name: "ops".into(),
            created_ms: 1,
            revoked_ms: None,
        };
        assert_eq!(admin_line(&a), "ops\tactive");
    }
}
