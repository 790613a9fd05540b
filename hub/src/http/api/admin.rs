//! The admin endpoints (`emsa_` token, `ems-hub admin add NAME`): devices
//! with their live state, provisioning, rotation and revocation of device,
//! viewer and admin tokens. A rotated or revoked device's live socket is
//! kicked at once (4001) rather than at the next revocation poll, and
//! every change reaches the tokens in memory before the answer; a revoked
//! device is removed from Home Assistant (MQTT bridge) at once too.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Request, StatusCode};
use serde::Deserialize;
use serde_json::json;

use super::states::{listing, states};
use super::{
    body, changed, check_admin, device_id, name, new_token, store, Answer, ApiError, RawAnswer,
};
use crate::auth::token::{self, TokenKind};
use crate::mailbox::Kick;
use crate::state::Shared;
use crate::store::ViewerScope;

/// `GET /api/admin/devices`: every device with its live state.
pub(super) async fn devices<B>(req: &Request<B>, shared: &Arc<Shared>) -> RawAnswer {
    check_admin(req, shared).await?;
    let devices = store(shared, |s| s.list_devices()).await?;
    let ids = devices.iter().map(|d| d.device_id.clone()).collect();
    let mut list = states(shared, ids).await?;
    for (state, info) in list.iter_mut().zip(devices) {
        state.created_ms = Some(info.created_ms);
        state.revoked_ms = Some(info.revoked_ms);
    }
    Ok((StatusCode::OK, listing(list).await?))
}

/// `POST /api/admin/devices` `{"device_id":"…"}`: 201 with the token
/// (shown once) and the env-file line.
pub(super) async fn add_device(req: Request<Incoming>, shared: &Arc<Shared>) -> Answer {
    check_admin(&req, shared).await?;
    let body: NewDevice = body(req).await?;
    let id = device_id(&body.device_id)?;
    let t = new_token(TokenKind::Device)?;
    let hash = token::hash(&t);
    let (id2, now) = (id.clone(), crate::store::now_ms());
    store(shared, move |s| s.add_device(&id2, &hash, now)).await?;
    changed(shared).await;
    log::info!("api: device {id} created");
    Ok((StatusCode::CREATED, device_token_body(&id, &t)))
}

/// `POST /api/admin/devices/{id}/rotate`: the new token.
pub(super) async fn rotate_device<B>(req: &Request<B>, shared: &Arc<Shared>, id: &str) -> Answer {
    check_admin(req, shared).await?;
    let id = device_id(id)?;
    let t = new_token(TokenKind::Device)?;
    let hash = token::hash(&t);
    let id2 = id.clone();
    store(shared, move |s| s.rotate_device(&id2, &hash)).await?;
    changed(shared).await;
    shared.registry.kick(&id, Kick::Revoked);
    log::info!("api: device {id} rotated");
    Ok((StatusCode::OK, device_token_body(&id, &t)))
}

/// `POST /api/admin/devices/{id}/revoke`.
pub(super) async fn revoke_device<B>(req: &Request<B>, shared: &Arc<Shared>, id: &str) -> Answer {
    check_admin(req, shared).await?;
    let id = device_id(id)?;
    let (id2, now) = (id.clone(), crate::store::now_ms());
    store(shared, move |s| s.revoke_device(&id2, now)).await?;
    changed(shared).await;
    shared.registry.kick(&id, Kick::Revoked);
    if let Some(m) = &shared.mqtt {
        m.device_removed(&id);
    }
    log::info!("api: device {id} revoked");
    Ok((StatusCode::OK, json!({ "device_id": id, "revoked": true })))
}

/// `GET /api/admin/viewers`: names, scopes and times, never tokens.
pub(super) async fn viewers<B>(req: &Request<B>, shared: &Arc<Shared>) -> Answer {
    check_admin(req, shared).await?;
    let viewers = store(shared, |s| s.list_viewers()).await?;
    let list: Vec<serde_json::Value> = viewers
        .into_iter()
        .map(|v| {
            let (all, devices) = match v.scope {
                ViewerScope::AllDevices => (true, Vec::new()),
                ViewerScope::Devices(d) => (false, d),
            };
            json!({
                "name": v.name,
                "all_devices": all,
                "devices": devices,
                "created_ms": v.created_ms,
                "revoked_ms": v.revoked_ms,
            })
        })
        .collect();
    Ok((StatusCode::OK, json!({ "viewers": list })))
}

/// `POST /api/admin/viewers` `{"name":"…","devices":["…"]}` or
/// `{"name":"…","all_devices":true}`: 201 with the token.
pub(super) async fn add_viewer(req: Request<Incoming>, shared: &Arc<Shared>) -> Answer {
    check_admin(&req, shared).await?;
    let body: NewViewer = body(req).await?;
    let name = name(&body.name)?;
    let scope = scope_of(&body)?;
    let t = new_token(TokenKind::Viewer)?;
    let hash = token::hash(&t);
    let (name2, now) = (name.clone(), crate::store::now_ms());
    store(shared, move |s| s.add_viewer(&name2, &hash, &scope, now)).await?;
    changed(shared).await;
    log::info!("api: viewer {name} created");
    Ok((StatusCode::CREATED, json!({ "name": name, "token": t })))
}

/// The scope a new viewer asks for: `devices` or `all_devices`, exactly
/// one of them.
fn scope_of(body: &NewViewer) -> Result<ViewerScope, ApiError> {
    if body.all_devices {
        if !body.devices.is_empty() {
            return Err(ApiError::BadRequest(
                "give devices or all_devices, not both".into(),
            ));
        }
        return Ok(ViewerScope::AllDevices);
    }
    if body.devices.is_empty() {
        return Err(ApiError::BadRequest(
            "a viewer needs at least one device, or all_devices".into(),
        ));
    }
    let mut ids = Vec::with_capacity(body.devices.len());
    for d in &body.devices {
        ids.push(device_id(d)?);
    }
    Ok(ViewerScope::Devices(ids))
}

/// `POST /api/admin/viewers/{name}/revoke`: its dashboards close with 4001
/// within `viewer_recheck`.
pub(super) async fn revoke_viewer<B>(req: &Request<B>, shared: &Arc<Shared>, n: &str) -> Answer {
    check_admin(req, shared).await?;
    let name = name(n)?;
    let (name2, now) = (name.clone(), crate::store::now_ms());
    store(shared, move |s| s.revoke_viewer(&name2, now)).await?;
    changed(shared).await;
    log::info!("api: viewer {name} revoked");
    Ok((StatusCode::OK, json!({ "name": name, "revoked": true })))
}

/// `GET /api/admin/admins`: names and times, never tokens.
pub(super) async fn admins<B>(req: &Request<B>, shared: &Arc<Shared>) -> Answer {
    check_admin(req, shared).await?;
    let admins = store(shared, |s| s.list_admins()).await?;
    let list: Vec<serde_json::Value> = admins
        .into_iter()
        .map(|a| {
            json!({
                "name": a.name,
                "created_ms": a.created_ms,
                "revoked_ms": a.revoked_ms,
            })
        })
        .collect();
    Ok((StatusCode::OK, json!({ "admins": list })))
}

/// `POST /api/admin/admins/{name}/revoke`: that admin token stops working
/// (here at once, on other hubs within a revocation poll); 409 for the
/// last active admin.
pub(super) async fn revoke_admin<B>(req: &Request<B>, shared: &Arc<Shared>, n: &str) -> Answer {
    check_admin(req, shared).await?;
    let name = name(n)?;
    let (name2, now) = (name.clone(), crate::store::now_ms());
    store(shared, move |s| s.revoke_admin(&name2, now)).await?;
    changed(shared).await;
    log::info!("api: admin {name} revoked");
    Ok((StatusCode::OK, json!({ "name": name, "revoked": true })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDevice {
    device_id: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewViewer {
    name: String,
    #[serde(default)]
    devices: Vec<String>,
    #[serde(default)]
    all_devices: bool,
}

fn device_token_body(id: &str, t: &str) -> serde_json::Value {
    json!({
        "device_id": id,
        "token": t,
        "env": format!("EMS_DEVICE_TOKEN={t}"),
    })
}
