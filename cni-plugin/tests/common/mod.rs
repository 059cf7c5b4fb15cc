//! The namespace lab from calyx-e2e, running this crate's `calyx` binary.

#![allow(dead_code)]

pub use calyx_e2e::lab::*;

pub fn new_lab() -> Lab {
    Lab::new(env!("CARGO_BIN_EXE_calyx"))
}
