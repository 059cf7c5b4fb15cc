//! calyx-agent: the per-node overlay agent. Not built yet (issue 4); this binary
//! says so instead of pretending to work.
fn main() {
    eprintln!("calyx-agent: the overlay agent is not implemented yet (see issue 4)");
    std::process::exit(2);
}
