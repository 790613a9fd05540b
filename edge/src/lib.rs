//! ems-edge (skeleton; being written)
pub mod hw;
pub mod meters;
pub mod tools;
