"""Low-level HTTP clients (control plane = Workload Manager, data plane = Router)."""
