//! The request-path router (`ems_hub::auth::handshake::route`): arbitrary
//! paths. Never a panic; a routed device id always satisfies
//! `validate_device_id` and is a suffix of the path.
#![no_main]

use ems_hub::auth::handshake::{route, Route};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(path) = std::str::from_utf8(data) else {
        return;
    };
    match route(path) {
        Route::Device(id) | Route::Dashboard(id) => {
            assert!(ems_shared::validate_device_id(id).is_ok(), "{id:?}");
            assert!(path.ends_with(id));
            assert!(path.starts_with("/ws/"));
        }
        _ => {}
    }
});
