//! sockudo-bench: the Pusher load generator (in progress).
fn main() {}
