//! ems-hub (skeleton; being written)
pub mod store;
