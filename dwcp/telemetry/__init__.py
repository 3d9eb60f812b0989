"""Link telemetry: per-flow samples from the kernel (TCP_INFO today; eBPF and inet_diag later)."""
