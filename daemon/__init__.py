"""The per-node supervisor: config, lifecycle, worker processes, embedded etcd, HTTP."""
