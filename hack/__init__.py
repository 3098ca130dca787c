"""Developer tooling that is not shipped: the control-plane build and the local dev cluster."""
