//! ems-edge (skeleton; being written)
pub mod meters;
pub mod tools;
