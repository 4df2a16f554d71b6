//! The host's randomness, for the devices that hand it to the guest (virtio-rng's buffers,
//! the VM generation ID).

/// Fills `bytes` from the host's random pool (the same one `/dev/urandom` reads).
pub fn getrandom(bytes: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < bytes.len() {
        let rest = &mut bytes[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes at `rest`, which this function
        // borrows mutably for the call.
        let got = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if got < 0 {
            let err = std::io::Error::last_os_error();
            // A signal can cut a large request short; ask again for the rest.
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        filled += got as usize;
    }
    Ok(())
}
