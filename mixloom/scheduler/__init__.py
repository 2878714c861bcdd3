"""Workers and scheduling: job leases, fair-share claims, memory admission, the composition
of each fused step, progress, checkpoints and adapter archives (`mixloom worker|serve`)."""
