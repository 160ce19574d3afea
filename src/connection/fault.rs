//! Fault injection for tests, in debug builds only: a connection task that subscribes to the
//! armed channel panics right after its subscription took effect, so that a test can prove
//! that no slot, gauge, subscription or presence member leaks when a connection task dies.
//! Release builds compile this to nothing.

#[cfg(debug_assertions)]
static PANIC_CHANNEL: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// Makes every connection task that subscribes to `channel` panic (debug builds; once per
/// process, so pick a channel name no other test uses).
#[cfg(debug_assertions)]
#[doc(hidden)]
pub fn panic_on_subscribe(channel: &str) {
    let _ = PANIC_CHANNEL.set(channel.to_owned());
}

#[cfg(debug_assertions)]
pub(super) fn maybe_panic(channel: &str) {
    if PANIC_CHANNEL.get().is_some_and(|armed| armed == channel) {
        panic!("fault injected: a connection task subscribed to {channel}");
    }
}

#[cfg(not(debug_assertions))]
#[inline(always)]
pub(super) fn maybe_panic(_channel: &str) {}
