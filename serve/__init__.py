"""HTTP/WebSocket ingress of the CPA Scheduler (Ray Serve + FastAPI). Thin: imports ``actors``."""
