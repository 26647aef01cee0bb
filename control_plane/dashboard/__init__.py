"""The operators' dashboard: static page + the JSON it polls (GET /v1/dashboard)."""
