"""Facts about the crash itself (the old kernel's log, hardware-error markers); never decides."""
