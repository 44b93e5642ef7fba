"""Operator tooling: elasticctl, Grafana dashboards, Prometheus alert rules."""
